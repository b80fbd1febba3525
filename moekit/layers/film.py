"""Feature-modulated experts: one shared expert body, a learned feature-wise scale and shift per expert.

Zhang et al. 2024, "Efficient Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear
Modulation" (MoFME, AAAI). Instead of E full FFNs, MoFME keeps one shared FFN and instantiates the
experts implicitly by feature-wise linear modulation (FiLM) of its hidden activation:

    h = act(W_gate x) * (W_up x)            [F], computed once per token
    expert_e(x) = W_down (gamma_e * h + beta_e),   gamma_e = 1 + scale_e
    y = sum_slots w_slot expert_e(x) = W_down (sum_slots w_slot (gamma_e * h + beta_e))

(the last step is exact because W_down is linear), so E experts cost one FFN plus E * 2F parameters,
and a token's k experts cost one FFN plus k elementwise products. Pair with the `uncertainty` router
(the paper's UaR) or any other router.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints


class FiLMExperts(nn.Module):
    """E experts sharing one gated FFN, each a feature-wise affine map of its hidden activation.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: width F of the shared FFN.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu".

    Parameters: `gate_up_proj [2F, D]`, `down_proj [D, F]` (shared), `scale [E, F]` (gamma - 1, init 0,
    so a model-wide small normal re-init keeps gamma near 1), `shift [E, F]` (beta, init 0).
    """

    expert_dims = {"scale": 0, "shift": 0}  # per-expert modulation; the FFN body is shared

    def __init__(self, *, num_experts: int, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        check_positive_ints("FiLMExperts: ", num_experts=num_experts, dim=dim, hidden=hidden)
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        self.act = get_activation(activation)
        self.gate_up_proj = nn.Parameter(torch.empty(2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(dim, hidden))
        self.scale = nn.Parameter(torch.zeros(num_experts, hidden))
        self.shift = nn.Parameter(torch.zeros(num_experts, hidden))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(hidden))

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing [T, k] -> [T, D]."""
        check_experts_input(self, x, routing)
        gate, up = (x @ self.gate_up_proj.t()).chunk(2, dim=-1)  # [T, F] each
        h = self.act(gate) * up  # [T, F], once per token
        ids = routing.expert_ids.clamp_min(0)  # [T, k]; empty slots carry weight 0
        w = routing.weights.to(h.dtype) * (routing.expert_ids >= 0)  # [T, k]
        gamma = (w.unsqueeze(-1) * (1.0 + self.scale[ids])).sum(dim=1)  # [T, k, F] -> [T, F]
        beta = (w.unsqueeze(-1) * self.shift[ids]).sum(dim=1)
        return (gamma * h + beta) @ self.down_proj.t()  # [T, F] x [F, D] -> [T, D]

    def config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "dim": self.dim, "hidden": self.hidden, "activation": self.activation}

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        The shared gated FFN runs once per token whatever the slots: 2 * 3 * D * F (the per-expert scale and
        shift, O(k F), are not counted)."""
        return float(2 * 3 * self.dim * self.hidden)


def check_experts_input(experts: nn.Module, x: Tensor, routing: Routing) -> None:
    """Raise unless x is [T, D] and routing covers T tokens over the experts' E."""
    who = type(experts).__name__
    if x.dim() != 2 or x.shape[1] != experts.dim:
        raise ValueError(f"{who}: expected input [T, {experts.dim}], got {tuple(x.shape)}")
    if routing.expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{who}: routing covers {routing.expert_ids.shape[0]} tokens but the input has {x.shape[0]}")
    if routing.num_experts != experts.num_experts:
        raise ValueError(
            f"{who}: routing is over {routing.num_experts} experts but this layer has {experts.num_experts}"
        )
