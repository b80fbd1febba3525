"""Training settings: a typed dataclass, checked at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.utils.checks import check_positive_ints


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batch, evaluation and checkpoint cadence."""

    steps: int = 200  # optimiser steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    eval_every: int = 50  # validate every n steps (and at the end)
    eval_windows: int = 16  # validation windows per label
    ckpt_every: int = 100  # checkpoint every n steps (and at the end, and on Ctrl-C)
    log_every: int = 10  # write a train log line every n steps
    seed: int = 0  # seeds model init, data order and router noise
    # THOR (Zuo et al. 2022): > 0 runs two forward passes per micro-batch (independent random routing draws) and
    # trains on their mean cross-entropy + consistency x symmetric KL between their predictions
    consistency: float = 0.0
    device: str = "cpu"  # where to train: "cpu" | "cuda" | "cuda:N" | "auto" (CUDA when available, else CPU)
    dtype: str = "float32"  # forward compute dtype: "float32" | "bfloat16" (torch.autocast; weights stay float32)
    bf16_on_cpu: bool = False  # allow dtype="bfloat16" on CPU (refused by default: much slower than float32 there)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_windows",
            "ckpt_every",
            "log_every",
        ):
            check_positive_ints("TrainConfig.", **{name: getattr(self, name)})
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if isinstance(self.consistency, bool) or not isinstance(self.consistency, int | float) or self.consistency < 0:
            raise ValueError(f"TrainConfig.consistency must be a number >= 0, got {self.consistency!r}")
        from moekit.train.device import DEVICES, DTYPES, is_device_name

        if not is_device_name(self.device):
            raise ValueError(f"TrainConfig.device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.bf16_on_cpu, bool):
            raise ValueError(f"TrainConfig.bf16_on_cpu must be true or false, got {self.bf16_on_cpu!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0")

    @classmethod
    def short_run(cls, steps: int, **fields: Any) -> TrainConfig:
        """A run compared against others (quickstart, leaderboard, benchmarks): warmup over the first 5% of
        the steps and one checkpoint, at the end, unless `fields` say otherwise."""
        return cls(steps=steps, **{"warmup_steps": max(1, steps // 20), "ckpt_every": steps, **fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys are an error that lists the valid ones."""
        from moekit.utils.dataclass import from_dict_strict

        return from_dict_strict(cls, d)
