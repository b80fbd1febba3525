"""Inference: offloaded generation with expert caches, cache simulation, steering (docs/infer.md)."""

from moekit.infer.cache import CacheStats, ExpertCache, parse_memory
from moekit.infer.offload import OffloadedExperts, Offloader, affinity_from_trace, load_offloaded
from moekit.infer.offload_hf import load_offloaded_hf
from moekit.infer.policies import list_policies, register_policy

__all__ = [
    "CacheStats", "ExpertCache", "OffloadedExperts", "Offloader", "affinity_from_trace", "list_policies",
    "load_offloaded", "load_offloaded_hf", "parse_memory", "register_policy",
]
