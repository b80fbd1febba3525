"""Autonomy-of-Experts routing: experts select themselves by the norm of their own low-rank activation.

Lv et al. 2025, "Autonomy-of-Experts Models" (AoE). There is no separate router: every expert's
gate projection is factorised, W_gate,e = B_e A_e with A_e [r, D] and B_e [F, r]; each token computes
the cheap low-rank activations z_e = A_e x [r] of all experts, and the k experts with the largest
norms ||z_e|| process it (the norm shows how much an expert "recognises" the token). Gate weights are
softmax over the norms, kept on the top k and renormalised. The chosen experts reuse their z_e
(gate = act(B_e z_e)), so selection costs only E * r * D per token.

moekit keeps the contract (routers decide, experts compute, they meet at `Routing`): this router
owns the factors A (`factor_a [E, r, D]`) and returns the chosen experts' activations as
`meta["latent"] [T, k, r]`; `moekit.layers.autonomy.AutonomyExperts` holds the rest of each expert
(B_e, up and down projections) and consumes the latent. Together they are exactly AoE's experts.
With ordinary `Experts` this router is a norm-of-projection router (the latent is then unused).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, check_logits, seq_len_of, softmax_top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import check_positive_ints


@register_router("autonomy")
class AutonomyRouter(Router):
    """Top-k of softmax(||A_e x||) over experts; meta["latent"] = the chosen A_e x [T, k, r].

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        rank: r, the rank of each expert's factorised gate projection (AoE: a fraction of D).
        load_balance: coefficient of the Switch load-balance loss (AoE keeps a balance loss).

    Parameters: `factor_a [E, r, D]`. Logits are the norms [T, E].
    """

    expert_dims = {"factor_a": 0}  # per-expert factors (moekit.layers.surgery)

    def __init__(self, *, dim: int, num_experts: int, k: int = 2, rank: int = 16, load_balance: float = 1e-2) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k, losses=dict(load_balance=load_balance))
        check_positive_ints(f"{self.who}: ", rank=rank)
        self.rank = rank
        self.factor_a = nn.Parameter(torch.randn(num_experts, rank, dim) / math.sqrt(dim))

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E], meta["latent"] [T, k, r]."""
        z = torch.einsum("td,erd->ter", self.checked_input(x, self.factor_a), self.factor_a)  # [T, E, r]
        logits = z.float().norm(dim=-1)  # [T, E]
        check_logits(logits, self.who)
        probs, weights, ids = softmax_top_k(logits, self.k, normalize=True)  # [T, E], [T, k], [T, k]
        latent = z.gather(1, ids.unsqueeze(-1).expand(-1, -1, self.rank))  # [T, k, r]
        aux = balance_losses(
            probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=0.0, seq_len=seq_len_of(context),
        )
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, meta={"latent": latent})
