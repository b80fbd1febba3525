"""REAP (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning"): an expert's saliency is
the mean over the token-slots routed to it of gate weight x ||expert output||_2; the lowest are pruned.
An expert never routed has saliency 0 (pruned first)."""

from __future__ import annotations

from moekit.compress.calibrate import LayerStats
from moekit.compress.prune import register_method, top_scored
from moekit.layers.moe import MoE


@register_method("reap", "keep the highest mean gate weight x expert output norm (REAP)")
def reap(layer: MoE, stats: LayerStats, keep: int, protected: list[int]) -> list[int]:
    return top_scored(stats.saliency().double(), keep, protected)
