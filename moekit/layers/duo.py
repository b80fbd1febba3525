"""Duo-LLM experts: a big and a small feed-forward expert per layer (plus a skip choice via a null expert).

Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large Language
Models". Each FFN layer holds its usual big FFN and a small auxiliary FFN; per token and layer a
router chooses the big module, the small one, or to skip the layer, so compute adapts to the token.

`DuoExperts` holds the two heterogeneous experts: id 0 is the big FFN (width `hidden`), id 1 the
small one (width `small_hidden`). The skip choice needs no expert: route with the `null_experts`
router (num_experts=2, num_null=1, k=1), whose null choice is an empty slot (no compute, zero
output, so the block reduces to its residual). `LMConfig(experts="duo", num_experts=2,
router="null_experts", router_args={"k": 1, "num_null": 1, "normalize": False})` builds it
(normalize=False keeps the chosen probability as the weight, so the router learns from the loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.film import check_experts_input
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints, is_positive_int


class DuoExperts(nn.Module):
    """Two gated experts of different widths: 0 = big (F), 1 = small (F_small).

    Args:
        num_experts: must be 2 (kept for the common experts signature).
        dim: model width D.
        hidden: width F of the big expert.
        small_hidden: width of the small expert (None: F // 4, at least 1).
        activation: "silu" | "gelu" | "gelu_tanh" | "relu".

    Parameters: `big_gate_up [2F, D]`, `big_down [D, F]`, `small_gate_up [2Fs, D]`, `small_down [D, Fs]`.
    """

    def __init__(
        self, *, num_experts: int = 2, dim: int, hidden: int, small_hidden: int | None = None, activation: str = "silu"
    ) -> None:
        super().__init__()
        if num_experts != 2:
            raise ValueError(f"DuoExperts: num_experts must be 2 (big, small), got {num_experts!r}")
        check_positive_ints("DuoExperts: ", dim=dim, hidden=hidden)
        if small_hidden is not None and not is_positive_int(small_hidden):
            raise ValueError(f"DuoExperts: small_hidden must be None or a positive integer, got {small_hidden!r}")
        self.num_experts, self.dim, self.hidden, self.activation = 2, dim, hidden, activation
        self.small_hidden = small_hidden
        Fs = self.small_width
        self.act = get_activation(activation)
        self.big_gate_up = nn.Parameter(torch.randn(2 * hidden, dim) / math.sqrt(dim))
        self.big_down = nn.Parameter(torch.randn(dim, hidden) / math.sqrt(hidden))
        self.small_gate_up = nn.Parameter(torch.randn(2 * Fs, dim) / math.sqrt(dim))
        self.small_down = nn.Parameter(torch.randn(dim, Fs) / math.sqrt(Fs))

    @property
    def small_width(self) -> int:
        """Width of the small expert."""
        return self.small_hidden or max(1, self.hidden // 4)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e (0 big, 1 small) on x [n, D] -> [n, D]."""
        W1, W2 = (self.big_gate_up, self.big_down) if e == 0 else (self.small_gate_up, self.small_down)
        gate, up = (x @ W1.t()).chunk(2, dim=-1)
        return (self.act(gate) * up) @ W2.t()

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing [T, k] over {0: big, 1: small} (-1: skip) -> [T, D]."""
        check_experts_input(self, x, routing)
        out = torch.zeros_like(x)
        for e in (0, 1):
            tok, slot = torch.where(routing.expert_ids == e)
            if tok.numel():
                y = self.expert(e, x[tok]) * routing.weights[tok, slot].unsqueeze(-1).to(x.dtype)
                out = out.index_add(0, tok, y)
        return out

    def config(self) -> dict[str, Any]:
        return {"num_experts": 2, "dim": self.dim, "hidden": self.hidden, "small_hidden": self.small_hidden,
                "activation": self.activation}

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        A slot of the big expert costs 2 * 3 * D * F, one of the small expert 2 * 3 * D * F_small."""
        return float(2 * 3 * self.dim * (self.hidden * load[0] + self.small_width * load[1]) / tokens)
