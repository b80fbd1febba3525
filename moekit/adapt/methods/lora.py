"""Plain LoRA: one low-rank update per target linear, no router.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685). Saves in peft's adapter
format (`moekit.adapt.save_peft`) and merges into the base weights.
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import ATTN, FFN, register_method


@register_method("lora")
def lora(*, targets: list[str] | None = None, rank: int = 8, alpha: float | None = None,
         num_experts: int = 1, k: int | None = None) -> AdaptConfig:
    """Plain LoRA (Hu et al. 2021): one update B A per target, mergeable, peft-compatible."""
    if num_experts != 1 or k not in (None, 1):
        raise ValueError(f"lora: plain LoRA has one expert and no router, got num_experts={num_experts}, k={k}")
    return AdaptConfig(method="lora", targets=list(targets or ATTN + FFN), rank=rank,
                       alpha=2.0 * rank if alpha is None else alpha)
