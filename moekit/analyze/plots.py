"""Figures of a routing analysis (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.utils.deps import pyplot


def load_heatmap(load: dict, out: Path) -> Path:
    """Layer x expert heat map of each expert's share of the layer's token-slots."""
    plt = pyplot()
    layers = sorted(load)
    M = np.array([np.array(load[l]["counts"], dtype=float) / max(sum(load[l]["counts"]), 1) for l in layers])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * M.shape[1] + 2), 0.35 * len(layers) + 1.8))
    im = ax.imshow(M, aspect="auto", cmap="magma")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_title("expert load (share of token-slots)")
    fig.colorbar(im, ax=ax)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def label_heatmaps(spec: dict, out: Path) -> Path:
    """Per layer: label x expert share P(expert | label)."""
    plt = pyplot()
    layers = sorted(spec["layers"])
    labels = spec["labels"]
    n = len(layers)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 1, 0.45 * len(labels) + 1.6), squeeze=False)
    vmax = max(np.max(spec["layers"][l]["share"]) for l in layers)
    for ax, l in zip(axes[0], layers, strict=True):
        im = ax.imshow(np.array(spec["layers"][l]["share"]), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"layer {l} (NMI {spec['layers'][l]['nmi']:.3f})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels))
    fig.colorbar(im, ax=axes[0].tolist(), label="P(expert | label)")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def affinity_heatmaps(aff: dict, out: Path, max_pairs: int = 4) -> Path:
    """P(expert at the next layer | expert at this layer) for the first few layer pairs."""
    plt = pyplot()
    pairs = list(aff)[:max_pairs]
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(3.4 * max(len(pairs), 1) + 1, 3.4), squeeze=False)
    for ax, p in zip(axes[0], pairs, strict=False):
        im = ax.imshow(np.array(aff[p]["conditional"]), cmap="Blues", vmin=0, vmax=1)
        score = aff[p]["score"]
        ax.set_title(f"{p}: score {'n/a' if score is None else f'{score:.2f}'}", fontsize=9)
        ax.set_xlabel("expert at next layer")
        ax.set_ylabel("expert")
    if pairs:
        fig.colorbar(im, ax=axes[0].tolist())
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def locality_curves(loc: dict, out: Path) -> Path:
    """SRP against segment length, and SCH against segment length for each cache size (layer average)."""
    plt = pyplot()
    layers = sorted(loc)
    Ls = sorted(loc[layers[0]]["srp"])
    ms = sorted(loc[layers[0]]["sch"][Ls[0]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for l in layers:
        axes[0].plot(Ls, [loc[l]["srp"][L] for L in Ls], marker="o", alpha=0.6, label=f"layer {l}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("segment length L")
    axes[0].set_ylabel("SRP")
    axes[0].set_title("segment routing best performance")
    axes[0].legend(fontsize=7)
    for m in ms:  # a cache that holds every expert (SCH None: not applicable) is left out
        ys = [[loc[l]["sch"][L][m] for l in layers] for L in Ls]
        if any(v is None for row in ys for v in row):
            continue
        axes[1].plot(Ls, [np.mean(row) for row in ys], marker="o", label=f"cache {m}k")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("segment length L")
    axes[1].set_ylabel("SCH (mean over layers)")
    axes[1].set_title("segment cache best hit rate")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
