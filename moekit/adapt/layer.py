"""`LoRAExperts`: a frozen `nn.Linear` plus N LoRA experts mixed per token by a moekit router.

    y = W x + b + (alpha / r) * sum_e g_e(x) * B_e A_e x

with g(x) [E] the router's weights (`Routing.weights` scattered over the E experts; 0 for unchosen ones).
Without a router there is one expert with g = 1: plain LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"), which is also what a one-expert mixture under a top-1 router computes.

Kinds (`AdaptConfig.kind`): "experts" (A_e, B_e per expert), "shared_a" (one A, N heads B_e: HydraLoRA),
"ranks" (one A [r, in], B [out, r]; the router chooses ranks: h = g(x) * (A x), SMoRA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.registry import build_router
from moekit.routing.routing import Routing


def dense_gates(routing: Routing, num_experts: int) -> Tensor:
    """Routing (expert_ids, weights [T, k]) -> gates [T, E]: each slot's weight at its expert, 0 elsewhere
    (slots marked -1 add nothing)."""
    ids, w = routing.expert_ids, routing.weights
    valid = ids >= 0
    g = torch.zeros(ids.shape[0], num_experts, dtype=w.dtype, device=w.device)
    return g.scatter_add(1, ids.clamp_min(0), torch.where(valid, w, torch.zeros_like(w)))


class LoRAExperts(nn.Module):
    """A wrapped linear layer. Parameters: `lora_A [E_A, r, in]`, `lora_B [E_B, out, r]` (E_A = E_B = N for
    kind "experts"; E_A = 1 for "shared_a"; E_A = E_B = 1 for "ranks"), and the router's own.

    The result of the last forward is kept on the layer, replaced by every call (`moekit.adapt.aux_loss`
    reads it): `last_aux` (the router's already-scaled auxiliary losses) and `last_routing`.
    """

    def __init__(
        self,
        *,
        base: nn.Linear,
        kind: str,
        num_experts: int,
        rank: int,
        alpha: float,
        router: str | None,
        router_args: dict,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAExperts: base must be an nn.Linear, got {type(base).__name__}")
        out_f, in_f = base.weight.shape
        if rank > min(in_f, out_f):
            raise ValueError(f"LoRAExperts: rank={rank} is larger than the layer ({out_f} x {in_f}); "
                             f"use rank <= {min(in_f, out_f)}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.rank = rank
        self.scaling = alpha / rank
        self.num_experts = rank if kind == "ranks" else num_experts
        n_a = num_experts if kind == "experts" else 1
        n_b = 1 if kind == "ranks" else num_experts
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(n_a, rank, in_f, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n_b, out_f, rank, dtype=w.dtype, device=w.device))
        for a in self.lora_A:  # as nn.Linear (and peft's default LoRA init) for each A; B = 0
            if init_std is None:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=init_std)
        self.router = None
        if router is not None:
            self.router = build_router(router, dim=in_f, num_experts=self.num_experts, **router_args).to(
                device=w.device, dtype=w.dtype
            )
        self.last_aux: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def mergeable(self) -> bool:
        """True when the update is one fixed matrix for every token (a single expert, no router)."""
        return self.router is None and self.lora_A.shape[0] == 1 and self.lora_B.shape[0] == 1

    def gates(self, x: Tensor) -> Tensor | None:
        """x [T, in] -> gates [T, E] (None without a router: expert 0 with weight 1); stores the routing."""
        if self.router is None:
            self.last_routing, self.last_aux = None, {}
            return None
        routing = self.router(x)
        self.last_routing, self.last_aux = routing, dict(routing.aux)
        return dense_gates(routing, self.num_experts).to(x.dtype)

    def delta(self, x: Tensor) -> Tensor:
        """x [T, in] -> the scaled LoRA update [T, out]."""
        g = self.gates(x)  # [T, E] or None
        if self.kind == "ranks":
            h = x @ self.lora_A[0].T  # [T, r]
            if g is not None:
                h = h * g  # each rank is an expert
            return self.scaling * (h @ self.lora_B[0].T)
        if g is None:
            return self.scaling * ((x @ self.lora_A[0].T) @ self.lora_B[0].T)
        if self.kind == "shared_a":
            h = x @ self.lora_A[0].T  # [T, r]
            hg = h[:, None, :] * g[:, :, None]  # [T, E, r]
        else:
            h = torch.einsum("ti,eri->ter", x, self.lora_A)  # [T, E, r]
            hg = h * g[:, :, None]
        return self.scaling * torch.einsum("ter,eor->to", hg, self.lora_B)  # [T, out]

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]: the frozen base plus the routed LoRA update (routing per token)."""
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        return y + self.delta(flat).reshape(*x.shape[:-1], -1).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A [out, in], for a mergeable layer."""
        if not self.mergeable:
            raise ValueError("LoRAExperts: only a single expert without a router can be merged into the base "
                             f"weight (this layer has {self.num_experts} experts and router {self.router_name!r})")
        return self.base.weight + self.scaling * (self.lora_B[0] @ self.lora_A[0])

    @property
    def router_name(self) -> str | None:
        return None if self.router is None else type(self.router).router_name  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, kind={self.kind}, experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:g}")
