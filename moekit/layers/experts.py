"""Experts with fused weights in the Hugging Face transformers 5.x layout (DESIGN.md, contract 3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.dispatch import autocast_dtype, check_expert_slice, get_backend, plan
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints


def check_input_dtype(who: str, x: Tensor, weight_dtype: torch.dtype | None) -> None:
    """Raise TypeError when x's dtype is not the weights' (a matmul would fail deep inside, or promote
    silently), naming both and the fix. Inside `torch.autocast` a mismatch is expected and allowed: the
    expert matmuls then run in autocast's dtype. `weight_dtype` None (no floating weights): no check."""
    if weight_dtype is None or x.dtype == weight_dtype or autocast_dtype(x) is not None:
        return
    raise TypeError(
        f"{who}: input dtype {x.dtype} does not match the weights' dtype {weight_dtype}; convert the input "
        f"(x.to({weight_dtype})) or the layer (layer.to({x.dtype})), or run under torch.autocast"
    )


class Experts(nn.Module):
    """E feed-forward experts stored fused.

    Gated (SwiGLU, GeGLU): `gate_up_proj [E, 2F, D]` (gate rows, then up rows), `down_proj [E, D, F]`,
    expert(x) = down @ (act(gate @ x) * (up @ x)).
    Non-gated: `up_proj [E, F, D]`, `down_proj [E, D, F]`, expert(x) = down @ act(up @ x).

    A layer may own a slice of the experts, [expert_offset, expert_offset + num_local_experts) of the E
    that routing is over (the seam of expert parallelism): its weights then hold E_local experts and
    `forward` computes only those, returning their part of the output (the parts of layers that own
    disjoint slices covering all E sum to the whole layer's output). `shard` cuts one from a whole layer.

    Args:
        num_experts: E, the experts routing is over.
        dim: model width D.
        hidden: expert width F.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu", or a gated-only one with arguments:
            "clamped_swiglu" (HY-V4, GPT-OSS; moekit.layers.activations).
        activation_args: keyword arguments of the activation (e.g. `{"limit": 7.0}`), or None.
        gated: gated (GLU) experts, or plain two-matrix experts.
        backend: dispatch backend name ("auto", "eager", "loop", "grouped").
        num_local_experts: E_local, the experts this layer holds and computes (None: all E).
        expert_offset: global id of the first expert this layer holds.
    """

    expert_dims = {"gate_up_proj": 0, "up_proj": 0, "down_proj": 0}  # per-expert weights (layers.surgery)

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "silu",
        activation_args: dict[str, Any] | None = None,
        gated: bool = True,
        backend: str = "auto",
        num_local_experts: int | None = None,
        expert_offset: int = 0,
    ) -> None:
        super().__init__()
        check_positive_ints("Experts: ", num_experts=num_experts, dim=dim, hidden=hidden)
        num_local = num_experts - expert_offset if num_local_experts is None else num_local_experts
        check_expert_slice("Experts", num_experts, expert_offset, num_local)
        self.act = get_activation(activation, **(activation_args or {}))
        if self.act.gated_only and not gated:
            raise ValueError(f"Experts: activation {activation!r} needs gated=True (it acts on gate and up together)")
        get_backend(backend)  # fail early on an unknown name
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation, self.gated, self.backend = activation, gated, backend
        self.expert_offset = expert_offset
        if gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * hidden, dim))
        else:
            self.up_proj = nn.Parameter(torch.empty(num_local, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_local, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init with std 1/sqrt(fan_in) for each projection."""
        first = self.gate_up_proj if self.gated else self.up_proj
        nn.init.normal_(first, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(self.hidden))

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the weights, which the input must have (outside torch.autocast)."""
        return self.down_proj.dtype

    @property
    def num_local_experts(self) -> int:
        """E_local, the experts this layer holds: the weights' leading dimension (code that changes the
        expert set by replacing the weights and `num_experts` keeps a whole layer whole)."""
        return self.down_proj.shape[0]

    @property
    def sharded(self) -> bool:
        """Whether this layer holds only some of the experts routing is over."""
        return self.num_local_experts != self.num_experts

    def shard(self, expert_offset: int, num_local_experts: int) -> Experts:
        """A new layer that holds experts [expert_offset, expert_offset + num_local_experts) of this one's
        (global ids), with copies of their weights (same dtype, device and requires_grad)."""
        check_expert_slice("Experts.shard", self.num_experts, expert_offset, num_local_experts)
        start = expert_offset - self.expert_offset
        if start < 0 or start + num_local_experts > self.num_local_experts:
            raise ValueError(
                f"Experts.shard: experts [{expert_offset}, {expert_offset + num_local_experts}) are not all held by "
                f"this layer, which holds [{self.expert_offset}, {self.expert_offset + self.num_local_experts})"
            )
        args = {**self.config(), "num_local_experts": num_local_experts, "expert_offset": expert_offset}
        with torch.device("meta"):
            new = Experts(**args)
        for name, w in self.named_parameters(recurse=False):
            part = w.detach()[start : start + num_local_experts].clone()
            setattr(new, name, nn.Parameter(part, requires_grad=w.requires_grad))
        return new

    def forward(self, x: Tensor, routing: Routing, *, backend: str | None = None) -> Tensor:
        """x: [T, D], routing with expert_ids/weights [T, k] -> [T, D] = sum over slots of the experts this
        layer holds (all E unless sharded) of weight * expert(x)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Experts: expected input [T, {self.dim}], got {tuple(x.shape)}")
        if routing.expert_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"Experts: routing covers {routing.expert_ids.shape[0]} tokens but the input has {x.shape[0]}"
            )
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"Experts: routing is over {routing.num_experts} experts but this layer has {self.num_experts}"
            )
        if x.dtype != self.down_proj.dtype:
            check_input_dtype("Experts", x, self.down_proj.dtype)
        fn = get_backend(backend or self.backend)
        p = plan(routing.expert_ids, self.num_experts, offset=self.expert_offset, num_local=self.num_local_experts)
        return fn(x.contiguous(), p, routing.weights, self)

    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments."""
        return {
            "num_experts": self.num_experts, "dim": self.dim, "hidden": self.hidden,
            "activation": self.activation, "gated": self.gated, "backend": self.backend,
            **({"activation_args": self.act.args()} if self.act.args() else {}),
            **({"num_local_experts": self.num_local_experts, "expert_offset": self.expert_offset}
               if self.sharded else {}),
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        Each token-slot costs one expert: 2 * 3 * D * F (gated) or 2 * 2 * D * F multiply-adds."""
        per = 2 * (3 if self.gated else 2) * self.dim * self.hidden
        return float(per * load.sum() / tokens)


__all__ = ["Experts", "check_input_dtype"]
