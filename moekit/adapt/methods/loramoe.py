"""LoRAMoE: LoRA experts on the FFN linears under a soft router, with the localized balancing constraint.

Dou et al. 2024, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin"
(ACL 2024, arXiv:2312.09979): each FFN linear W0 becomes o = W0 x + sum_i G(x)_i B_i A_i x with G = softmax(W_g x)
over all experts (dense, no top-k), and the experts split into groups (world knowledge / downstream task) that
the localized balancing constraint (`moekit.adapt.balance`) balances within a group and lets specialise between
groups, given each training sample's type (`moekit.adapt.set_sample_groups`; `moekit adapt` uses the domain label
modulo the number of groups). Defaults: 6 experts in 2 groups, rank 4, beta = delta = 0.1 (our reading of the
paper's setup). No Switch load-balance loss.
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import FFN, register_method


@register_method("loramoe")
def loramoe(*, targets: list[str] | None = None, num_experts: int = 6, rank: int = 4, alpha: float | None = None,
            k: int | None = None, groups: int = 2, beta: float = 0.1, delta: float = 0.1) -> AdaptConfig:
    """LoRAMoE (Dou et al. 2024): soft-routed LoRA experts on the FFN linears, localized balancing constraint."""
    if k not in (None, num_experts):
        raise ValueError(f"loramoe: the router is soft over all {num_experts} experts; k must be unset, got {k}")
    return AdaptConfig(
        method="loramoe", targets=list(targets or FFN), num_experts=num_experts, rank=rank,
        alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=num_experts, normalize=True, load_balance=0.0),  # k = N: the full softmax
        expert_groups=groups, localized_balance=beta, balance_delta=delta,
    )
