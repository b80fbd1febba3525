"""Reference budgets: how long, on what data and (for `smoke`) at what size the reference models train.

The model configs live in `moekit.models.presets` (`ref-dense`, `ref-dense-4x`, `ref-moe`, `ref-moe-fg`); a
budget only overrides their sizes (`model_overrides`) and sets the training schedule and the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.data import DataConfig, reference_data_config
from moekit.models import LMConfig
from moekit.models.presets import preset
from moekit.train.config import TrainConfig
from moekit.utils.checks import check_positive_ints

MODELS = ("ref-dense", "ref-moe", "ref-moe-fg")  # what `build` trains by default
ALL_MODELS = ("ref-dense", "ref-dense-4x", "ref-moe", "ref-moe-fg")  # every reference preset
DATA_SEED = 0  # every model seed trains on the same corpus draw, tokenizer and validation set


@dataclass(frozen=True)
class RefBudget:
    """One training budget for the reference models."""

    name: str  # the budget's name (the cache folder `ref/<name>/`)
    steps: int  # optimiser steps
    batch_size: int  # sequences per step
    seq_len: int  # tokens per sequence
    lr: float  # peak learning rate (AdamW, warmup + cosine)
    warmup: int  # linear warmup steps
    eval_every: int  # validate every n steps (the loss curve `moe_vs_dense` reads)
    eval_windows: int  # validation windows per domain
    ckpt_every: int  # checkpoint every n steps: what an interruption can lose at most
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields (see `ref_data_config`)
    # preset name -> LMConfig fields replacing the preset's; "all" applies to every model first
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # preset name -> TrainConfig fields replacing the budget's (each model's own tuned learning rate)
    train_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""  # what it costs, shown by `moekit ref list`

    def __post_init__(self) -> None:
        check_positive_ints(
            "RefBudget.", steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
            eval_every=self.eval_every, eval_windows=self.eval_windows, ckpt_every=self.ckpt_every,
        )
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"RefBudget.warmup must be an integer in [0, steps={self.steps}), got {self.warmup!r}")
        if not self.lr > 0:
            raise ValueError(f"RefBudget.lr must be > 0, got {self.lr!r}")
        unknown = (set(self.model_overrides) | set(self.train_overrides)) - {"all", *ALL_MODELS}
        if unknown:
            raise ValueError(f"RefBudget.model_overrides/train_overrides: unknown models {sorted(unknown)}; "
                             "known: all, " + ", ".join(ALL_MODELS))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


# the sweep's best learning rate per reference model (benchmarks/ref_sweep.py, benchmarks/results/tune/): 3e-3 for
# both swept models (1.5e-3 and 6e-3 lost at every output scale tried); ref-dense-4x and ref-moe-fg take their
# family's. The budget's lr serves any model not named here.
REF_TUNED: dict[str, dict[str, Any]] = {
    "ref-dense": {"lr": 3e-3}, "ref-dense-4x": {"lr": 3e-3}, "ref-moe": {"lr": 3e-3}, "ref-moe-fg": {"lr": 3e-3},
}

_MICRO = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)

BUDGETS: dict[str, RefBudget] = {
    # seconds on a CPU: tests and CI. The same presets at micro size (the dense/MoE width ratios kept).
    "smoke": RefBudget(
        name="smoke", steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_every=3, eval_windows=2,
        ckpt_every=3, data={"vocab_size": 320, "max_chars_per_domain": 60_000},
        model_overrides={
            "all": _MICRO,
            "ref-dense": {"ffn_hidden": 64},
            "ref-dense-4x": {"ffn_hidden": 256},
            "ref-moe": {"num_experts": 8, "expert_hidden": 32},
            "ref-moe-fg": {"num_experts": 32, "expert_hidden": 8, "num_shared_experts": 2},
        },
        note="seconds: micro models, for tests",
    ),
    # 2000 x 16 x 256 = 8.2M training tokens per model, one pass over a third of the reference corpus (22.8M
    # training tokens: nothing is seen twice). Learning rates and scales from the sweep in
    # benchmarks/results/tune/ (each model at its own best).
    "ref": RefBudget(
        name="ref", steps=2000, batch_size=16, seq_len=256, lr=3e-3, warmup=100, eval_every=200, eval_windows=32,
        ckpt_every=200, data={"reference": True}, train_overrides=REF_TUNED,
        note="about 40-60 min per model on 2 CPU cores (one thread each, two at a time); minutes on a GPU",
    ),
}


def get_budget(budget: str | RefBudget) -> RefBudget:
    """The budget named `budget` (or `budget` itself); an unknown name lists the known ones."""
    if isinstance(budget, RefBudget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown reference budget {budget!r}; known budgets: {', '.join(BUDGETS)}")
    return BUDGETS[budget]


def check_model(name: str) -> None:
    if name not in ALL_MODELS:
        raise ValueError(f"unknown reference model {name!r}; known: {', '.join(ALL_MODELS)}")


def ref_data_config(budget: str | RefBudget, seed: int = 0) -> DataConfig:
    """The data a budget trains on: the built-in corpus with the budget's DataConfig fields. The corpus draw is
    the same for every model seed (DATA_SEED), so seeds differ only in init and batch order and share one
    tokenizer and validation set; `seed` is accepted so that a per-seed corpus could be chosen here alone."""
    del seed
    fields = dict(get_budget(budget).data)
    if fields.pop("reference", False):  # the large built-in corpus (moekit.data.reference_data_config)
        return dataclasses.replace(reference_data_config(seed=DATA_SEED), **fields)
    return DataConfig(**{"seed": DATA_SEED, **fields})


def model_config(name: str, budget: str | RefBudget, vocab_size: int) -> LMConfig:
    """The preset `name` with the budget's size overrides and the tokenizer's vocabulary."""
    check_model(name)
    b = get_budget(budget)
    fields = {**b.model_overrides.get("all", {}), **b.model_overrides.get(name, {})}
    return preset(name, **fields, vocab_size=vocab_size)


def train_config(
    budget: str | RefBudget, seed: int, *, device: str = "cpu", dtype: str = "float32", model: str | None = None
) -> TrainConfig:
    """The training settings of `model` (every model when None: the budget's own) under `budget`."""
    b = get_budget(budget)
    cfg = TrainConfig(
        steps=b.steps, batch_size=b.batch_size, seq_len=b.seq_len, lr=b.lr, warmup_steps=b.warmup,
        eval_every=b.eval_every, eval_windows=b.eval_windows, ckpt_every=b.ckpt_every, log_every=1, seed=seed,
        device=device, dtype=dtype,
    )
    return dataclasses.replace(cfg, **b.train_overrides.get(model, {})) if model else cfg


def budget_dict(budget: str | RefBudget) -> dict[str, Any]:
    return dataclasses.asdict(get_budget(budget))
