"""SMoRA: each rank of one LoRA is an expert; a router activates the top-k ranks per token.

Zhao et al. 2025, "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning"
(arXiv:2501.15103): h = g(x) * (A x), y = W x + B h with g the top-k gate over the r ranks, balanced without an
auxiliary loss by a per-rank selection bias (DeepSeek-V3's loss-free balancing; moekit's `topk` router with
`selection_bias=True`).
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import ATTN, FFN, register_method


@register_method("smora")
def smora(*, targets: list[str] | None = None, rank: int = 16, k: int = 4, alpha: float | None = None,
          num_experts: int | None = None) -> AdaptConfig:
    """SMoRA (Zhao et al. 2025): the r ranks of one LoRA are experts, top-k ranks per token, loss-free balance."""
    if num_experts not in (None, rank):
        raise ValueError(f"smora: the experts are the {rank} ranks; num_experts must be unset, got {num_experts}")
    return AdaptConfig(
        method="smora", targets=list(targets or ATTN + FFN), kind="ranks", num_experts=1, rank=rank,
        alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=k, normalize=False, load_balance=0.0, selection_bias=True),
    )
