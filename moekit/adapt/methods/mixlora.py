"""MixLoRA: top-k routed LoRA experts on the feed-forward projections, with a load-balance loss.

Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts"
(arXiv:2404.15159): 8 LoRA experts, top-2 routing, the Switch load-balance loss (coefficient 0.01).

Difference from the paper: there, one router per FFN block chooses whole experts (each expert is the base FFN with
LoRA on gate/up/down). Here every FFN projection is wrapped on its own and has its own router over its input —
the per-linear mechanism of `moekit.adapt` — so the down projection's experts are chosen by its own router.
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import FFN, register_method


@register_method("mixlora")
def mixlora(*, targets: list[str] | None = None, num_experts: int = 8, k: int = 2, rank: int = 8,
            alpha: float | None = None, load_balance: float = 0.01) -> AdaptConfig:
    """MixLoRA (Li et al. 2024): top-k LoRA experts on the FFN projections, load-balance loss."""
    return AdaptConfig(
        method="mixlora", targets=list(targets or FFN), num_experts=num_experts, rank=rank,
        alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=k, normalize=True, load_balance=load_balance),
    )
