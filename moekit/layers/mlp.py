"""A dense feed-forward block: the dense baseline and the shared expert (Hugging Face layout:
`gate_proj`, `up_proj`, `down_proj` linears, as in Qwen2-MoE's `shared_expert`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation


class MLP(nn.Module):
    """y = down(act(gate(x)) * up(x)) when gated, else down(act(up(x))).

    Args:
        dim: model width D.
        hidden: inner width F.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu".
        gated: gated (GLU) or plain two-matrix MLP.
    """

    def __init__(self, *, dim: int, hidden: int, activation: str = "silu", gated: bool = True) -> None:
        super().__init__()
        self.act = get_activation(activation)
        self.dim, self.hidden, self.activation, self.gated = dim, hidden, activation, gated
        if gated:
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the weights, which the input must have (outside torch.autocast)."""
        return self.down_proj.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)

    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments."""
        return {"dim": self.dim, "hidden": self.hidden, "activation": self.activation, "gated": self.gated}
