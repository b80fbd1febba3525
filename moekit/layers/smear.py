"""SMEAR experts: the router's weights average the experts' parameters into one merged expert.

Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing" (SMEAR, TMLR 2024). Discrete
routing needs gradient estimators; SMEAR instead merges: with routing probabilities p over the E
experts, one expert with parameters theta = sum_e p_e theta_e processes the input. In the paper p is
computed once per example (from the example's average representation; see the `smear` router) and
the merged expert costs one expert evaluation plus the merge.

Two exact computations, chosen from the routing:
- per example (`routing.meta["example_weights"] [B, E]`, set by the `smear` router with
  causal=False): merge the weights once per example, W_b = sum_e p_be W_e, and run one batched
  expert per example — the paper's computation;
- per token (any other routing, e.g. the causal `smear` router of a language model, whose weights
  differ from token to token): the merged expert of token t is applied through linearity,
  (sum_e p_te W_e) x_t = sum_e p_te (W_e x_t) for both projections — the reference, which costs E
  expert projections per token.
A test checks that both agree, gradients included. Parameters use the fused `Experts` layout
(`gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`, gated).
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


class SmearExperts(nn.Module):
    """E gated experts that are merged, not dispatched: every token uses sum_e p_e * expert_e's weights.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: expert width F.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu".
    """

    needs_full_sequence = True  # SMEAR merges the experts per example: whole sequences, not a subset of one
    expert_dims = {"gate_up_proj": 0, "down_proj": 0}  # per-expert weights (layers.surgery)

    def __init__(self, *, num_experts: int, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        check_positive_ints("SmearExperts: ", num_experts=num_experts, dim=dim, hidden=hidden)
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        self.act = get_activation(activation)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(hidden))

    def _glu(self, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing [T, k] (any k; -1 slots ignored) -> [T, D]."""
        check_experts_input(self, x, routing)
        ex = routing.meta.get("example_weights")
        if ex is not None and ex.dim() == 2 and x.shape[0] % ex.shape[0] == 0:
            return self.forward_per_example(x, ex.to(x.dtype))
        return self.forward_per_token(x, dense_weights(routing).to(x.dtype))

    def forward_per_example(self, x: Tensor, p: Tensor) -> Tensor:
        """x: [T, D] as B examples of T/B tokens, p: [B, E] -> [T, D] with one merged expert per example."""
        B = p.shape[0]
        W1 = torch.einsum("be,efd->bfd", p, self.gate_up_proj)  # [B, 2F, D]
        W2 = torch.einsum("be,edf->bdf", p, self.down_proj)  # [B, D, F]
        xb = x.reshape(B, -1, self.dim)  # [B, L, D]
        h = self._glu(torch.bmm(xb, W1.transpose(1, 2)))  # [B, L, 2F] -> [B, L, F]
        return torch.bmm(h, W2.transpose(1, 2)).reshape(-1, self.dim)  # [B, L, D] -> [T, D]

    def forward_per_token(self, x: Tensor, p: Tensor) -> Tensor:
        """Reference: x [T, D], p [T, E] -> [T, D], the merged expert of each token through linearity."""
        h = torch.einsum("td,efd->tef", x, self.gate_up_proj)  # [T, E, 2F]
        h = self._glu((p.unsqueeze(-1) * h).sum(dim=1))  # [T, 2F] -> [T, F]
        y = torch.einsum("tf,edf->ted", h, self.down_proj)  # [T, E, D]
        return (p.unsqueeze(-1) * y).sum(dim=1)

    def config(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "dim": self.dim, "hidden": self.hidden, "activation": self.activation}

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        One merged gated expert per token whatever the slots: 2 * 3 * D * F (the merge itself, E expert
        projections per token in `forward_per_token`, is not counted)."""
        return float(2 * 3 * self.dim * self.hidden)


def dense_weights(routing: Routing) -> Tensor:
    """[T, E] merge weights from the routing's slots (-1 slots contribute nothing)."""
    T = routing.num_tokens
    p = routing.weights.new_zeros(T, routing.num_experts + 1)
    p = p.scatter_add(1, routing.expert_ids + 1, routing.weights)
    return p[:, 1:]
