"""Validation: loss per label on fixed windows, and expert load per label and MoE layer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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


@torch.no_grad()
def evaluate(model: MoELM, windows: dict[str, tuple[Tensor, Tensor]], batch_size: int = 16) -> EvalResult:
    """windows: label -> (inputs [N, L], targets [N, L]). The model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    losses, counts, experts = {}, {}, {}
    moe_layers: list[int] = []
    total_loss, total_tokens = 0.0, 0
    for label, (x, y) in windows.items():
        label_loss, label_tokens = 0.0, 0
        label_experts: list[Tensor] | None = None
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
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
