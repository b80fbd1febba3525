"""Validation: loss per label on fixed windows, and expert load per label and MoE layer.

One definition of a run's validation loss, used by training (every `eval_every` steps and at the end),
by `moekit eval` and by the quickstart: the windows of `validation_windows(data, train.seq_len,
train.eval_windows)`, evaluated in batches of `train.batch_size`. So `moekit eval RUN` prints the final
validation loss that training printed and logged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.models import MoELM


@dataclass
class EvalResult:
    """Validation numbers of one model on one set of windows."""

    loss: float  # token-weighted mean cross-entropy over every window
    loss_per_label: dict[str, float]  # mean cross-entropy per label (domain)
    tokens_per_label: dict[str, int]  # target tokens per label
    # expert_counts[label][i] = token-slots per expert at the i-th MoE layer ([E] list), for MoE models
    expert_counts: dict[str, list[list[int]]] = field(default_factory=dict)
    moe_layers: list[int] = field(default_factory=list)  # block indices of the MoE layers
    # measured experts per token at each MoE layer: token-slots over tokens (what a variable-k router
    # such as top-p really uses; a mixture-of-depths block counts the tokens it skipped as 0)
    experts_per_token: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def validation_windows(data: Any, seq_len: int, per_label: int) -> dict[str, tuple[Tensor, Tensor]]:
    """label -> (inputs [N, L], targets [N, L]) from the validation split of `data` (a `PreparedData`):
    at most `per_label` fixed windows per label. A label whose validation text is shorter than one window
    is left out with a warning naming it (never a loss over 0 tokens); no window at all is a ValueError."""
    wins = data.val.val_windows(seq_len, max_windows_per_label=per_label)
    out = {label: (w[:, :-1], w[:, 1:]) for label, w in wins.items() if len(w)}
    tokens = data.val.tokens_per_label()
    for label in sorted(set(wins) - set(out)):
        warnings.warn(
            f"label {label!r} has {tokens.get(label, 0)} validation tokens, fewer than one window of "
            f"{seq_len + 1}; it is left out of validation",
            stacklevel=2,
        )
    if not out:
        raise ValueError(
            f"no validation window of {seq_len + 1} tokens fits in the validation split (tokens per label: "
            f"{tokens}); use a shorter seq_len or more data"
        )
    return out


def evaluate_run(
    run: str | Path, *, windows: int | None = None, seq_len: int | None = None, progress: bool = False
) -> tuple[dict, EvalResult]:
    """(config.json of the checkpoint, validation of its model) on the data the run was trained on, with
    the run's own validation settings (`eval_windows`, `seq_len`, `batch_size`) unless overridden."""
    from moekit.data import DataConfig, prepare_data
    from moekit.train.checkpoint import load_model, read_meta

    meta = read_meta(run)
    train = meta.get("train")
    if not isinstance(train, dict) or not isinstance(meta.get("data"), dict):
        raise ValueError(f"{run}: the checkpoint's config.json has no train or data config (not a training run)")
    model = load_model(run)
    data = prepare_data(DataConfig(**meta["data"]), progress=progress)
    wins = validation_windows(data, seq_len or train["seq_len"], windows or train["eval_windows"])
    return meta, evaluate(model, wins, batch_size=train["batch_size"])


@torch.no_grad()
def evaluate(model: MoELM, windows: dict[str, tuple[Tensor, Tensor]], batch_size: int = 16) -> EvalResult:
    """windows: label -> (inputs [N, L], targets [N, L]). The model is put in eval mode and restored.
    A label without windows has no loss (it is not reported as 0 over 0 tokens). The windows are moved to the
    model's device batch by batch; the forward runs in the weights' dtype (float32: no autocast)."""
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    losses, counts, experts = {}, {}, {}
    moe_layers: list[int] = []
    total_loss, total_tokens = 0.0, 0
    for label, (x, y) in windows.items():
        if not x.shape[0]:
            continue
        label_loss, label_tokens = 0.0, 0
        label_experts: list[Tensor] | None = None
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)  # no copy on CPU
            out = model(xb)
            loss = F.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), yb.reshape(-1), reduction="sum"
            )
            label_loss += float(loss)
            label_tokens += yb.numel()
            per_layer = [r.tokens_per_expert() for r in out.routings if r is not None]
            if per_layer:
                moe_layers = [j for j, r in enumerate(out.routings) if r is not None]
                if label_experts is None:
                    label_experts = per_layer
                else:
                    label_experts = [a + b for a, b in zip(label_experts, per_layer, strict=True)]
        losses[label] = label_loss / max(label_tokens, 1)
        counts[label] = label_tokens
        total_loss += label_loss
        total_tokens += label_tokens
        if label_experts is not None:
            experts[label] = [t.tolist() for t in label_experts]
    model.train(was_training)
    slots = [sum(sum(per_label[i]) for per_label in experts.values()) for i in range(len(moe_layers))]
    per_token = [n / max(total_tokens, 1) for n in slots]
    return EvalResult(total_loss / max(total_tokens, 1), losses, counts, experts, moe_layers, per_token)


def measured_experts_per_token(run_dir: str | Path) -> tuple[int, float] | None:
    """(step, mean over MoE layers of the measured experts per token) from the last validation in a run's
    eval.jsonl that recorded it, or None (a dense run, no log, or a run from before it was recorded)."""
    log = Path(run_dir) / "eval.jsonl"
    if not log.is_file():
        return None
    found = None
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
            per_layer = row["experts_per_token"]
            found = (int(row["step"]), sum(per_layer) / len(per_layer))
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            continue  # a line from an older version, or one cut short by a crash
    return found
