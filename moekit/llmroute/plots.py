"""Cost-quality and PGR plots of evaluated routers (matplotlib, written to PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.llmroute.evaluate import Evaluation
from moekit.llmroute.metrics import upper_hull
from moekit.llmroute.table import RoutingTable
from moekit.utils.deps import pyplot


def plot_cost_quality(evals: list[Evaluation], table: RoutingTable, path: str | Path, title: str = "") -> Path:
    """Each router's hull in the cost-quality plane, with the single models as points; returns the path."""
    plt = pyplot(extra="llmroute")
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, ev in enumerate(evals):
        h = upper_hull(ev.cost, ev.quality)
        ax.plot(ev.cost[h] * 1000, ev.quality[h], color=colors[i % 20], label=f"{ev.name} (AIQ {ev.aiq:.3f})")
    c, q = table.mean_cost(), table.mean_quality()
    ax.scatter(c * 1000, q, color="black", zorder=5)
    for name, ci, qi in zip(table.models, c, q, strict=True):
        ax.annotate(name.split("/")[-1], (ci * 1000, qi), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if evals:
        ax.axhline(evals[0].target_quality, color="grey", ls=":", lw=1, label="95% of strong quality")
    ax.set_xlabel("mean cost per query ($ per 1000 queries)")
    ax.set_ylabel("mean quality")
    ax.set_title(title or "cost vs quality")
    return _finish(plt, fig, ax, path)


def _finish(plt, fig, ax, path: str | Path) -> Path:
    """Legend, grid, save (creating the folder), close; returns the path."""
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pgr(evals: list[Evaluation], path: str | Path, title: str = "") -> Path:
    """PGR against the share of strong calls (two-model evaluations only); returns the path."""
    plt = pyplot(extra="llmroute")
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, ev in enumerate(evals):
        if ev.curve is None:
            continue
        ax.plot(ev.curve.share, ev.curve.pgr, color=colors[i % 20], label=f"{ev.name} (APGR {ev.apgr:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set_xlabel("share of calls to the strong model")
    ax.set_ylabel("PGR (performance gap recovered)")
    lows = [float(np.min(e.curve.pgr)) for e in evals if e.curve is not None]
    ax.set_ylim(min([-0.1, *lows]), None)
    ax.set_title(title or "PGR vs strong calls")
    return _finish(plt, fig, ax, path)
