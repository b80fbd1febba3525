"""Low-rank delta experts: every expert is a shared base matrix plus its own rank-r delta,
W_e = B + U_e V_e, for each of the two projections (the storage of expert decomposition,
`moekit.compress.decompose`; Gu et al. 2025, "Delta Decompression for MoE-based LLMs Compression").

Parameters (gated; non-gated experts name the first projection `up_*`, of F rows):
    gate_up_base [2F, D], gate_up_u [E, 2F, r1], gate_up_v [E, r1, D]   (gate rows, then up rows)
    down_base [D, F],     down_u [E, D, r2],     down_v [E, r2, F]
with r1 = min(r, 2F, D) and r2 = min(r, D, F) (a projection's rank never exceeds its own smaller side).
The forward pass never forms an expert's full matrix: the base projection of the first matrix runs once per
token, each routed slot adds (x V_e^T) U_e^T, and since the second projection is linear the base part of it
runs once per token on the weight-summed hidden states. `materialize()` gives the plain `Experts` back.

The rank may differ per layer: `rank` is an int, or a dict {block index (str): rank} read with the `layer`
the model passes at construction (`moekit.layers.variants.build_experts`), so a checkpoint's config.json
rebuilds every layer at its own rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.film import check_experts_input
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints


def max_rank(dim: int, hidden: int, gated: bool = True) -> int:
    """The largest useful rank: the larger of the two projections' smaller sides."""
    return max(min(2 * hidden if gated else hidden, dim), min(dim, hidden))


class LowRankExperts(nn.Module):
    """E experts stored as a shared base plus per-expert low-rank deltas (see the module docstring).

    Args:
        num_experts: E.
        dim: model width D.
        hidden: expert width F.
        activation, activation_args, gated: as `Experts`.
        rank: r, in [0, max_rank(D, F, gated)], or {str(block): r} (then `layer` picks the entry).
        layer: the block index of this layer (given by the model builder).
    """

    expert_dims = {"gate_up_u": 0, "gate_up_v": 0, "up_u": 0, "up_v": 0, "down_u": 0, "down_v": 0}

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "silu",
        activation_args: dict[str, Any] | None = None,
        gated: bool = True,
        rank: int | dict[str, int] = 0,
        layer: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints("LowRankExperts: ", num_experts=num_experts, dim=dim, hidden=hidden)
        self.ranks = rank
        if isinstance(rank, dict):
            if layer is None or str(layer) not in rank:
                raise ValueError(f"LowRankExperts: rank is per block {sorted(rank)}, but this layer's block is "
                                 f"{layer!r}")
            rank = rank[str(layer)]
        top = max_rank(dim, hidden, gated)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= top:
            raise ValueError(f"LowRankExperts: rank must be an integer in [0, {top}] (D={dim}, F={hidden}), "
                             f"got {rank!r}")
        self.act = get_activation(activation, **(activation_args or {}))
        if self.act.gated_only and not gated:
            raise ValueError(f"LowRankExperts: activation {activation!r} needs gated=True")
        self.num_experts, self.dim, self.hidden, self.rank, self.layer = num_experts, dim, hidden, rank, layer
        self.activation, self.gated = activation, gated
        self.first = "gate_up" if gated else "up"
        n1 = 2 * hidden if gated else hidden
        self.shapes = {self.first: (n1, dim), "down": (dim, hidden)}  # name -> [out, in]
        for name, (n, k) in self.shapes.items():
            r = min(rank, n, k)
            self.register_parameter(f"{name}_base", nn.Parameter(torch.empty(n, k)))
            self.register_parameter(f"{name}_u", nn.Parameter(torch.zeros(num_experts, n, r)))
            self.register_parameter(f"{name}_v", nn.Parameter(torch.empty(num_experts, r, k)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base ~ N(0, 1/fan_in), V ~ N(0, 1/fan_in), U = 0: every expert starts as the base."""
        for name, (_, k) in self.shapes.items():
            nn.init.normal_(getattr(self, f"{name}_base"), std=1.0 / math.sqrt(k))
            nn.init.normal_(getattr(self, f"{name}_v"), std=1.0 / math.sqrt(k))
            nn.init.zeros_(getattr(self, f"{name}_u"))

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.down_base.dtype

    def factors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """(base [N, K], U [E, N, r], V [E, r, K]) of projection `name` ("gate_up"/"up" or "down")."""
        return getattr(self, f"{name}_base"), getattr(self, f"{name}_u"), getattr(self, f"{name}_v")

    def expert_weight(self, name: str, e: int) -> Tensor:
        """The full matrix [N, K] of projection `name` of expert e: base + U_e V_e."""
        base, u, v = self.factors(name)
        return base + u[e] @ v[e]

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing with expert_ids/weights [T, k] (-1: empty slot) -> [T, D]."""
        check_experts_input(self, x, routing)
        check_input_dtype("LowRankExperts", x, self.weight_dtype)
        b1, u1, v1 = self.factors(self.first)
        b2, u2, v2 = self.factors("down")
        first = x @ b1.t()  # [T, D] x [D, N1] -> [T, N1]: the shared base, once per token
        hsum = x.new_zeros(x.shape[0], self.hidden)  # sum over slots of weight * hidden state
        out = torch.zeros_like(x)
        for e in routing.expert_ids.unique().tolist():
            if e < 0:
                continue
            tok, slot = torch.where(routing.expert_ids == e)
            h = first[tok] + (x[tok] @ v1[e].t()) @ u1[e].t()  # [n, r1] -> [n, N1]
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = self.act.glu(gate, up)  # [n, F]
            else:
                h = self.act(h)
            h = h * routing.weights[tok, slot].unsqueeze(-1).to(h.dtype)
            hsum = hsum.index_add(0, tok, h)
            out = out.index_add(0, tok, (h @ v2[e].t()) @ u2[e].t())  # [n, r2] -> [n, D]
        return out + hsum @ b2.t()  # the base of the second projection, once per token

    def materialize(self) -> Experts:
        """Plain fused `Experts` with W_e = base + U_e V_e (same dtype, device and activation)."""
        with torch.device("meta"):
            new = Experts(num_experts=self.num_experts, dim=self.dim, hidden=self.hidden, activation=self.activation,
                          activation_args=self.act.args() or None, gated=self.gated)
        for name in self.shapes:
            base, u, v = (t.detach() for t in self.factors(name))
            full = base.unsqueeze(0) + torch.bmm(u, v)  # [E, N, K]
            setattr(new, f"{name}_proj", nn.Parameter(full.contiguous()))
        return new

    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments (the per-block rank dict when built from one)."""
        return {"num_experts": self.num_experts, "dim": self.dim, "hidden": self.hidden,
                "activation": self.activation, "gated": self.gated, "rank": self.ranks,
                **({"activation_args": self.act.args()} if self.act.args() else {}),
                **({"layer": self.layer} if self.layer is not None else {})}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, rank={self.rank}"

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token given `load [E]` (token-slots per expert): the two base projections once
        per token, plus per slot the two low-rank deltas and, as `Experts`, nothing else."""
        n1, k1 = self.shapes[self.first]
        n2, k2 = self.shapes["down"]
        r1, r2 = min(self.rank, n1, k1), min(self.rank, n2, k2)
        base = 2 * (n1 * k1 + n2 * k2)
        per_slot = 2 * (r1 * (n1 + k1) + r2 * (n2 + k2))
        return float(base + per_slot * load.sum() / tokens)


__all__ = ["LowRankExperts", "max_rank"]
