"""Experts variants by name, for configs: `LMConfig(experts="film", experts_args={...})`.

"ffn" is the standard fused `Experts` (the dispatch backends apply); the others change what an expert
is: "film" (MoFME feature-modulated experts), "smear" (SMEAR merged experts), "duo" (Duo-LLM big and
small experts), "autonomy" (Autonomy-of-Experts factorised experts, with the `autonomy` router), "hecto"
(Hecto GRU + FFN experts). Every variant takes `num_experts`, `dim`, `hidden`, `activation` and its own
keyword arguments, and has `forward(x [T, D], routing) -> [T, D]`; a variant that needs more names the
keywords in its signature ("hecto": `seq_len`, `cache`, `layer`, `iteration`), and `MoE` passes them
(`moekit.layers.moe.EXPERTS_KEYWORDS`). A variant that needs whole sequences says `needs_full_sequence = True`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moekit.layers.autonomy import AutonomyExperts
from moekit.layers.duo import DuoExperts
from moekit.layers.experts import Experts
from moekit.layers.film import FiLMExperts
from moekit.layers.hecto import HectoExperts
from moekit.layers.smear import SmearExperts

EXPERTS_VARIANTS: dict[str, type[nn.Module]] = {
    "ffn": Experts,
    "film": FiLMExperts,
    "smear": SmearExperts,
    "duo": DuoExperts,
    "autonomy": AutonomyExperts,
    "hecto": HectoExperts,
}


def build_experts(
    name: str,
    *,
    num_experts: int,
    dim: int,
    hidden: int,
    activation: str = "silu",
    backend: str = "auto",
    **args: Any,
) -> nn.Module:
    """The experts variant `name`; `backend` applies to "ffn" only. Unknown names list the known ones."""
    if name not in EXPERTS_VARIANTS:
        raise ValueError(f"unknown experts variant {name!r}; known: {', '.join(EXPERTS_VARIANTS)}")
    common = dict(num_experts=num_experts, dim=dim, hidden=hidden, activation=activation)
    if name == "ffn":
        return Experts(**common, backend=backend, **args)
    return EXPERTS_VARIANTS[name](**common, **args)
