"""Autonomy-of-Experts experts: gated experts whose gate projection is factorised, W_gate = B A.

Lv et al. 2025, "Autonomy-of-Experts Models" (AoE). The first factor A_e [r, D] lives in the
`autonomy` router (`moekit.routing.autonomy`), which computes z_e = A_e x for every expert and lets
the experts with the largest ||z_e|| proceed; it hands the chosen experts' z in
`routing.meta["latent"] [T, k, r]`. This module holds the rest of each expert:

    expert_e(x) = W_down,e (act(B_e z_e) * (W_up,e x)),

so the pair (router, experts) computes exactly AoE's experts with gate projection B_e A_e.
Parameters: `gate_b [E, F, r]`, `up_proj [E, F, D]`, `down_proj [E, D, F]`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.film import check_experts_input
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints


class AutonomyExperts(nn.Module):
    """E gated experts with factorised gates; needs the `autonomy` router's `meta["latent"]`.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: expert width F.
        rank: r, must equal the router's rank.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu".
    """

    expert_dims = {"gate_b": 0, "up_proj": 0, "down_proj": 0}  # A_e lives in the router

    def __init__(self, *, num_experts: int, dim: int, hidden: int, rank: int = 16, activation: str = "silu") -> None:
        super().__init__()
        check_positive_ints("AutonomyExperts: ", num_experts=num_experts, dim=dim, hidden=hidden, rank=rank)
        self.num_experts, self.dim, self.hidden, self.rank, self.activation = num_experts, dim, hidden, rank, activation
        self.act = get_activation(activation)
        self.gate_b = nn.Parameter(torch.randn(num_experts, hidden, rank) / math.sqrt(rank))
        self.up_proj = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(dim))
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(hidden))

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing [T, k] with meta["latent"] [T, k, r] -> [T, D]."""
        check_experts_input(self, x, routing)
        latent = routing.meta.get("latent")
        if latent is None or latent.shape != (*routing.expert_ids.shape, self.rank):
            got = None if latent is None else tuple(latent.shape)
            raise ValueError(
                f"AutonomyExperts: needs the autonomy router's meta['latent'] of shape [T, k, r={self.rank}] "
                f"= {(*routing.expert_ids.shape, self.rank)}, got {got}; use router='autonomy' with the same rank"
            )
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(routing.expert_ids == e)
            if tok.numel() == 0:
                continue
            gate = latent[tok, slot].to(x.dtype) @ self.gate_b[e].t()  # [n, r] x [r, F] -> [n, F]
            up = x[tok] @ self.up_proj[e].t()  # [n, F]
            y = (self.act(gate) * up) @ self.down_proj[e].t()  # [n, D]
            out = out.index_add(0, tok, y * routing.weights[tok, slot].unsqueeze(-1).to(y.dtype))
        return out

    def config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "dim": self.dim, "hidden": self.hidden, "rank": self.rank,
                "activation": self.activation}

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        Each slot is counted as a gated expert, 2 * 3 * D * F, as the leaderboard always has (the rank-r gate
        makes a slot 2 * (2 D F + r F); the router's r x D projection of every token is router compute)."""
        return float(2 * 3 * self.dim * self.hidden * load.sum() / tokens)
