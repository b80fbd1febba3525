"""Plots and a markdown report for training runs: loss curves, domain x expert heat maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moekit.utils.deps import pyplot


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL log (empty when the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(runs: dict[str, Path], out: Path, *, many: bool = False) -> Path:
    """Training loss (train.jsonl) and validation loss (eval.jsonl) against step, one line per run.

    many=True (the router leaderboard's dozens of runs): a wider figure, tab20 colours (dashed after the 20th
    run), small markers and one legend right of the plots; else default colours and a legend on each plot."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8) if many else (10, 3.6))
    cmap = plt.get_cmap("tab20")
    for i, (name, run) in enumerate(runs.items()):
        style: dict = dict(color=cmap(i % 20), linestyle="-" if i < 20 else "--") if many else {}
        tr, ev = read_jsonl(run / "train.jsonl"), read_jsonl(run / "eval.jsonl")
        if tr:
            axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name, alpha=0.8, **style)
        if ev:
            marks = dict(marker="o", markersize=3) if many else dict(marker="o")
            axes[1].plot([r["step"] for r in ev], [r["loss"] for r in ev], label=name, **marks, **style)
    for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not many:
            ax.legend()
    if many:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), ncol=1 + len(runs) // 16)
        fig.savefig(out, dpi=110, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def domain_expert_shares(expert_counts: dict[str, list[list[int]]]) -> tuple[list[str], np.ndarray]:
    """labels, shares [layers, labels, E]: each label's token-slots per expert as a fraction of that label's slots."""
    labels = sorted(expert_counts)
    counts = np.array([expert_counts[label] for label in labels], dtype=np.float64)  # [labels, layers, E]
    counts = counts.transpose(1, 0, 2)  # [layers, labels, E]
    shares = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return labels, shares


def plot_domain_expert_heatmap(expert_counts: dict[str, list[list[int]]], moe_layers: list[int], out: Path) -> Path:
    """One heat map per MoE layer: rows = domains, columns = experts, colour = share of the domain's tokens."""
    plt = pyplot()
    labels, shares = domain_expert_shares(expert_counts)
    n = shares.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 0.5 * len(labels) + 1.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(shares[i], aspect="auto", cmap="viridis", vmin=0, vmax=max(shares.max(), 1e-9))
        ax.set_title(f"layer {moe_layers[i] if i < len(moe_layers) else i}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(shares.shape[2]))
        ax.set_yticks(range(len(labels)), labels if i == 0 else [""] * len(labels))
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's token-slots")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def specialists(expert_counts: dict[str, list[list[int]]], top: int = 2) -> dict[str, list[list[tuple[int, float]]]]:
    """Per domain and MoE layer, the experts most over-used by that domain: (expert, lift), where
    lift = the domain's share of the expert / the expert's share over all domains (1.0 = no preference)."""
    labels, shares = domain_expert_shares(expert_counts)
    counts = np.array([expert_counts[label] for label in labels], dtype=np.float64).transpose(1, 0, 2)
    overall = counts.sum(axis=1) / np.maximum(counts.sum(axis=(1, 2))[:, None], 1)  # [layers, E]
    lift = shares / np.maximum(overall[:, None, :], 1e-12)  # [layers, labels, E]
    out: dict[str, list[list[tuple[int, float]]]] = {}
    for j, label in enumerate(labels):
        out[label] = [
            [(int(e), float(lift[i, j, e])) for e in np.argsort(-lift[i, j])[:top]] for i in range(lift.shape[0])
        ]
    return out
