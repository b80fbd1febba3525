"""HydraLoRA: an asymmetric LoRA with one shared A and N B heads mixed by a soft router.

Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning" (NeurIPS 2024,
arXiv:2404.19245): y = W x + sum_i w_i(x) B_i A x with w = softmax(W_g x) over all N heads (no top-k).
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import ATTN, FFN, register_method


@register_method("hydralora")
def hydralora(*, targets: list[str] | None = None, num_experts: int = 4, rank: int = 8,
              alpha: float | None = None, k: int | None = None) -> AdaptConfig:
    """HydraLoRA (Tian et al. 2024): one shared A, N B heads, softmax over all heads."""
    if k not in (None, num_experts):
        raise ValueError(f"hydralora: the router is soft over all {num_experts} heads; k must be unset, got {k}")
    return AdaptConfig(
        method="hydralora", targets=list(targets or ATTN + FFN), kind="shared_a", num_experts=num_experts,
        rank=rank, alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=num_experts, normalize=True, load_balance=0.0),  # k = N: the full softmax
    )
