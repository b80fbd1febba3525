"""Experts, the MoE layer, dense MLPs and dispatch backends."""

from moekit.layers.dispatch import get_backend, list_backends, register_backend
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP
from moekit.layers.moe import MoE

__all__ = ["MLP", "Experts", "MoE", "get_backend", "list_backends", "register_backend"]
