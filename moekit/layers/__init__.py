"""Experts, the MoE layer, dense MLPs, dispatch backends and expert-set surgery."""

from moekit.layers.dispatch import get_backend, list_backends, register_backend
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP
from moekit.layers.moe import MoE
from moekit.layers.surgery import add_experts, keep_experts, merge_experts, replace_expert

__all__ = [
    "MLP",
    "Experts",
    "MoE",
    "add_experts",
    "get_backend",
    "keep_experts",
    "list_backends",
    "merge_experts",
    "register_backend",
    "replace_expert",
]
