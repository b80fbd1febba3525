"""Compression of MoE models (issue 14): calibration, expert pruning, dynamic skipping and quantized experts
(docs/compress.md)."""

from moekit.compress.calibrate import Calibration, LayerStats, calibrate, calibration_batches
from moekit.compress.prune import PruneResult, kept_count, list_methods, prune, super_experts
from moekit.compress.quant import QuantizedExperts, load_quantized, quantize_experts, save_quantized
from moekit.compress.skip import SkippingRouter, disable_skipping, enable_skipping

__all__ = [
    "Calibration",
    "LayerStats",
    "PruneResult",
    "QuantizedExperts",
    "SkippingRouter",
    "calibrate",
    "calibration_batches",
    "disable_skipping",
    "enable_skipping",
    "kept_count",
    "list_methods",
    "load_quantized",
    "prune",
    "quantize_experts",
    "save_quantized",
    "super_experts",
]
