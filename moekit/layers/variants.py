"""Experts variants by name, for configs: `LMConfig(experts="film", experts_args={...})`.

"ffn" is the standard fused `Experts` (the dispatch backends apply); the others change what an expert
is: "film" (MoFME feature-modulated experts), "smear" (SMEAR merged experts), "duo" (Duo-LLM big and
small experts), "autonomy" (Autonomy-of-Experts factorised experts, with the `autonomy` router), "hecto"
(Hecto GRU + FFN experts), "lowrank" (a shared base plus per-expert low-rank deltas, what expert decomposition
writes: moekit.compress.decompose), "qat" (binary or ternary weights with a straight-through estimator,
what quantization-aware training trains: moekit.compress.qat). Every variant takes `num_experts`, `dim`, `hidden`,
`activation` and its own keyword arguments, and has `forward(x [T, D], routing) -> [T, D]`; a variant that needs
more names the keywords in its signature ("hecto": `seq_len`, `cache`, `layer`, `iteration`), and `MoE` passes them
(`moekit.layers.moe.EXPERTS_KEYWORDS`). A variant that needs whole sequences says `needs_full_sequence = True`.
A variant whose constructor takes `layer` gets the block index it is built for (so a config can hold per-layer
sizes: "lowrank"'s per-block ranks).
Every variant declares `flops_per_token(load [E], tokens) -> float`, its routed experts' forward FLOPs per
token given the token-slots each expert processed (what `moekit.bench` counts as active expert compute).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from moekit.layers.autonomy import AutonomyExperts
from moekit.layers.duo import DuoExperts
from moekit.layers.experts import Experts
from moekit.layers.film import FiLMExperts
from moekit.layers.hecto import HectoExperts
from moekit.layers.lowrank import LowRankExperts
from moekit.layers.qat import QATExperts
from moekit.layers.smear import SmearExperts
from moekit.utils.registry import Registry

EXPERTS_VARIANTS: Registry[type[nn.Module]] = Registry("experts variant")
register_experts = EXPERTS_VARIANTS.register  # decorator for a variant defined elsewhere: @register_experts("name")

register_experts("ffn")(Experts)
register_experts("film")(FiLMExperts)
register_experts("smear")(SmearExperts)
register_experts("duo")(DuoExperts)
register_experts("autonomy")(AutonomyExperts)
register_experts("hecto")(HectoExperts)
register_experts("lowrank")(LowRankExperts)
register_experts("qat")(QATExperts)


def build_experts(
    name: str,
    *,
    num_experts: int,
    dim: int,
    hidden: int,
    activation: str = "silu",
    backend: str = "auto",
    layer: int | None = None,
    **args: Any,
) -> nn.Module:
    """The experts variant `name`; `backend` goes to variants that take it ("ffn"), `layer` (the block index) to
    variants whose constructor takes it ("lowrank"). Unknown names list the known ones (`UnknownNameError`, a
    ValueError)."""
    cls = EXPERTS_VARIANTS.get(name)
    common = dict(num_experts=num_experts, dim=dim, hidden=hidden, activation=activation)
    params = inspect.signature(cls).parameters
    if "backend" in params:  # variants that use the dispatch backends
        common["backend"] = backend
    if "layer" in params and layer is not None:
        common["layer"] = layer
    return cls(**common, **args)
