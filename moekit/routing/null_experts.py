"""Top-k routing with null experts: a token may choose "no expert" for some of its k slots.

Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language
Models": the gate scores E real experts plus N null experts (empty operations, no compute);
softmax over all E + N, top-k over all of them, so a token that picks nulls uses fewer real experts.
The load-balance loss runs over all E + N experts, but the null experts are one group: their
dispatch fraction f and mean probability P are replaced by the group's means, so the loss does not
ask the (identical) null experts to balance among themselves, only controls their average use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, softmax_top_k
from moekit.routing.losses import expert_fraction
from moekit.routing.losses import z_loss as z_loss_fn
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.routing.scope import batch_mean
from moekit.utils.checks import check_positive_ints


def null_load_balance_loss(probs: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """(E + N) * sum_i f_i P_i over E real and N null experts, nulls' f and P set to their group mean.

    Args:
        probs: [T, E + N] routing probabilities (rows sum to 1).
        expert_ids: [T, k] choices in [0, E + N) before nulls are emptied (ids >= E are nulls).
        num_experts: E.
    Returns:
        scalar; 1.0 when f and P are uniform over all E + N.
    """
    M = probs.shape[-1]
    f = expert_fraction(expert_ids, M).to(probs.dtype)  # [E + N], share of the T*k slots
    P = batch_mean(probs)  # [E + N] (this rank's share inside a batch scope)
    real = (f[:num_experts] * P[:num_experts]).sum()
    null = (M - num_experts) * f[num_experts:].mean() * P[num_experts:].mean()
    return M * (real + null)


@register_router("null_experts")
class NullExpertsRouter(Router):
    """Top-k over E real + N null experts; null choices become empty slots.

    Args:
        dim: model width D.
        num_experts: E real experts.
        num_null: N null experts (>= 1); the gate has E + N outputs.
        k: slots per token (over real and null experts together); k <= E + N.
        normalize: rescale the k chosen probabilities (nulls included) to sum 1, as Mixtral.
        load_balance: coefficient of the null-aware load-balance loss (`null_load_balance_loss`).
        z_loss: coefficient of the ST-MoE router z-loss over all E + N logits.
        routed_scale: multiplies the k weights, null slots' included (`Router.scale_weights`; 1.0: off).
            No selection bias here: it would push the (identical) null experts to balance among themselves.

    Returns expert_ids/weights [T, k] with null slots as -1/0, logits [T, E + N], and
    `meta["null_weight"] [T, k]`: the weight a null slot had (0 on real slots). A null expert
    outputs zero, so dropping its slot leaves the layer output unchanged and costs no compute.
    """

    expert_dims = {"weight": 0}  # E real rows, then N null rows that surgery keeps

    variable_k = True
    token_local = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        num_null: int = 1,
        k: int = 2,
        normalize: bool = True,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
        routed_scale: float = 1.0,
    ) -> None:
        who = type(self).__name__
        check_positive_ints(f"{who}: ", num_null=num_null)
        super().__init__(
            dim=dim, num_experts=num_experts, gate_outputs=num_experts + num_null,
            losses=dict(load_balance=load_balance, z_loss=z_loss), routed_scale=routed_scale,
        )
        M = num_experts + num_null
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= M:
            raise ValueError(f"{who}: k must be an integer in [1, num_experts + num_null = {M}], got {k!r}")
        self.num_null = num_null
        self.k = k
        self.normalize = normalize

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E + N]."""
        logits = self.gate_logits(x)  # [T, E + N]
        probs, weights, ids = softmax_top_k(logits, self.k, normalize=self.normalize)  # [T, E + N]; [T, k] over both
        weights = self.scale_weights(weights)
        is_null = ids >= self.num_experts  # [T, k]
        zero = torch.zeros((), device=weights.device, dtype=weights.dtype)
        aux: dict[str, Tensor] = {}
        if self.load_balance:
            aux["load_balance"] = self.load_balance * null_load_balance_loss(probs, ids, self.num_experts)
        if self.z_loss:
            aux["z_loss"] = self.z_loss * z_loss_fn(logits)
        return Routing(
            torch.where(is_null, -1, ids),
            torch.where(is_null, zero, weights).to(x.dtype),
            logits,
            self.num_experts,
            aux=aux,
            meta={"null_weight": torch.where(is_null, weights, zero).to(x.dtype)},
        )
