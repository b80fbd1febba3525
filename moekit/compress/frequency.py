"""Frequency pruning: keep the experts the calibration routed the most token-slots to (the baseline every
pruning method must beat; e.g. the frequency baseline of Lu et al. 2024, "Not All Experts are Equal")."""

from __future__ import annotations

from moekit.compress.calibrate import LayerStats
from moekit.compress.prune import register_method, top_scored
from moekit.layers.moe import MoE


@register_method("frequency", "keep the most often routed experts (baseline)")
def frequency(layer: MoE, stats: LayerStats, keep: int, protected: list[int]) -> list[int]:
    return top_scored(stats.counts.double(), keep, protected)
