"""MixLoRA per projection ("mixlora-proj"): top-k routed LoRA experts on each FFN linear, each with its own router.

A variant of Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of
Experts" (arXiv:2404.15159) on the per-linear mechanism of `moekit.adapt`: gate_proj, up_proj and down_proj are
wrapped separately, each routes its own input among its N LoRA experts (top-k, Switch load balance). It is not
the paper's layout (one router per FFN block choosing whole expert FFNs: the method "mixlora"), but it works on
any linear layer, e.g. attention projections or FFNs that are not gate/up/down blocks.
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import FFN, register_method


@register_method("mixlora-proj")
def mixlora_proj(*, targets: list[str] | None = None, num_experts: int = 8, k: int = 2, rank: int = 8,
                 alpha: float | None = None, load_balance: float = 0.01) -> AdaptConfig:
    """MixLoRA per projection: top-k LoRA experts on each FFN linear with its own router, load-balance loss."""
    return AdaptConfig(
        method="mixlora-proj", targets=list(targets or FFN), num_experts=num_experts, rank=rank,
        alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=k, normalize=True, load_balance=load_balance),
    )
