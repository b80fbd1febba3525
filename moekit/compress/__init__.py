"""Compression of MoE models (issue 14): calibration, expert pruning, merging (MC-SMoE), decomposition (SVD),
dynamic skipping and quantized experts (docs/compress.md)."""

from moekit.compress.calibrate import Calibration, LayerStats, calibrate, calibration_batches
from moekit.compress.decompose import DecomposeResult, decompose
from moekit.compress.mcsmoe import MergeResult, mcsmoe
from moekit.compress.methods import get_compressor, list_compressors
from moekit.compress.prune import PruneResult, kept_count, list_methods, prune, super_experts
from moekit.compress.quant import QuantizedExperts, load_quantized, quantize_experts, save_quantized
from moekit.compress.skip import SkippingRouter, disable_skipping, enable_skipping

__all__ = [
    "Calibration",
    "DecomposeResult",
    "LayerStats",
    "MergeResult",
    "PruneResult",
    "QuantizedExperts",
    "SkippingRouter",
    "calibrate",
    "calibration_batches",
    "decompose",
    "disable_skipping",
    "enable_skipping",
    "get_compressor",
    "kept_count",
    "list_compressors",
    "list_methods",
    "load_quantized",
    "mcsmoe",
    "prune",
    "quantize_experts",
    "save_quantized",
    "super_experts",
]
