"""`LoRAExperts`: a frozen `nn.Linear` plus N LoRA experts mixed per token by a moekit router.

    y = W x + b + (alpha / r) * sum_e g_e(x) * B_e A_e x

with g(x) [E] the router's weights (`Routing.weights` scattered over the E experts; 0 for unchosen ones).
Without a router there is one expert with g = 1: plain LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"), which is also what a one-expert mixture under a top-1 router computes.

Kinds (`AdaptConfig.kind`): "experts" (A_e, B_e per expert), "shared_a" (one A, N heads B_e: HydraLoRA),
"ranks" (one A [r, in], B [out, r]; the router chooses ranks: h = g(x) * (A x), SMoRA).

Two exact ways to compute the mixture: the dense path evaluates every expert's B_e A_e x and weights it by the
gates (zero for unchosen experts; the only way for a soft router); the sparse path gathers the chosen experts'
A and B per token slot and computes only those (A[ids] [T, k, r, in], B[ids] [T, k, out, r]). `forward` takes the
sparse path when the router is sparse (k < E) and the batch has at most `sparse_max_slots` token-slots (T * k,
cached generation), where gathering weights is cheaper than computing E experts; `delta_dense` (the reference) and
`delta_sparse` are public and a test checks that they agree, gradients included. Larger sparse batches (training)
take the grouped path (`delta_grouped`, kind "experts"): token-slots sorted by expert, each expert's LoRA on its
rows only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.adapt.balance import localized_balance_aux
from moekit.routing.registry import build_router
from moekit.routing.routing import Routing


def dense_gates(routing: Routing, num_experts: int) -> Tensor:
    """Routing (expert_ids, weights [T, k]) -> gates [T, E]: each slot's weight at its expert, 0 elsewhere
    (slots marked -1 add nothing)."""
    ids, w = routing.expert_ids, routing.weights
    valid = ids >= 0
    g = torch.zeros(ids.shape[0], num_experts, dtype=w.dtype, device=w.device)
    return g.scatter_add(1, ids.clamp_min(0), torch.where(valid, w, torch.zeros_like(w)))


def routing_slots(routing: Routing) -> tuple[Tensor, Tensor]:
    """Routing -> (ids [T, k] with empty slots (-1) pointing at expert 0, weights [T, k] with 0 at empty slots)."""
    ids, w = routing.expert_ids, routing.weights
    valid = ids >= 0
    return ids.clamp_min(0), torch.where(valid, w, torch.zeros_like(w))


def grouped_rows(routing: Routing, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """The token-slots of a routing sorted by expert: (token index [T*k], weight [T*k] (0 for empty slots), the
    number of rows of each expert [E]) — rows of expert e follow those of e - 1."""
    ids, w = routing_slots(routing)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order // ids.shape[1], w.reshape(-1)[order], counts


def per_expert(rows: Tensor, counts: list[int], fn) -> Tensor:
    """rows [R, in] sorted by expert (`grouped_rows`) -> cat over experts e of fn(e, its rows) [R, out]."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(fn(e, rows[start:start + n]))
        start += n
    return torch.cat(outs)


def is_sparse(routing: Routing | None, num_experts: int) -> bool:
    """Whether a routing chooses fewer slots than there are experts (a soft router's k equals E)."""
    return routing is not None and routing.top_k < num_experts


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
        expert_groups: int = 1,
        localized_balance: float = 0.0,
        balance_delta: float = 0.1,
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
        self.expert_groups, self.localized_balance, self.balance_delta = expert_groups, localized_balance, balance_delta
        self.sample_groups: Tensor | None = None  # [M] per training sample (`moekit.adapt.set_sample_groups`)
        self.last_aux: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    sparse_max_slots: int = 256  # the sparse path runs when T * k <= this (and k < E)

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

    def route(self, x: Tensor) -> Routing | None:
        """x [T, in] -> the router's Routing (None without a router); stores it and its aux losses."""
        routing = None if self.router is None else self.router(x)
        self.last_routing = routing
        self.last_aux = {} if routing is None else dict(routing.aux)
        return routing

    def gates(self, x: Tensor) -> Tensor | None:
        """x [T, in] -> gates [T, E] (None without a router: expert 0 with weight 1); stores the routing."""
        routing = self.route(x)
        return None if routing is None else dense_gates(routing, self.num_experts).to(x.dtype)

    def delta_dense(self, x: Tensor, g: Tensor | None) -> Tensor:
        """x [T, in], gates [T, E] (or None: expert 0 alone) -> the scaled LoRA update [T, out], every expert
        computed and weighted (the reference path)."""
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

    def delta_sparse(self, x: Tensor, routing: Routing) -> Tensor:
        """x [T, in], a routing with k slots -> the scaled LoRA update [T, out], computing only the chosen
        experts (kinds "experts" and "shared_a")."""
        if self.kind == "ranks":
            raise ValueError("LoRAExperts.delta_sparse: kind 'ranks' has one LoRA; use delta_dense")
        ids, w = routing_slots(routing)  # [T, k]
        w = w.to(x.dtype)
        if self.kind == "shared_a":
            h = (x @ self.lora_A[0].T)[:, None, :] * w[:, :, None]  # [T, k, r]
        else:
            h = (self.lora_A[ids] @ x[:, None, :, None]).squeeze(-1) * w[:, :, None]  # A[ids] [T, k, r, in]
        return self.scaling * (self.lora_B[ids] @ h[..., None]).squeeze(-1).sum(1)  # B[ids] [T, k, out, r]

    def delta_grouped(self, x: Tensor, routing: Routing) -> Tensor:
        """x [T, in], a routing -> the scaled LoRA update [T, out]: the token-slots sorted by expert, each expert's
        LoRA on its own rows only (kind "experts"; the sparse path for many tokens)."""
        if self.kind != "experts":
            raise ValueError(f"LoRAExperts.delta_grouped: kind {self.kind!r} has no separate experts")
        tok, w, counts = grouped_rows(routing, self.num_experts)
        out = per_expert(x[tok], counts, lambda e, v: (v @ self.lora_A[e].T) @ self.lora_B[e].T)  # [T*k, out]
        return self.scaling * x.new_zeros(x.shape[0], out.shape[1]).index_add(0, tok, out * w[:, None].to(x.dtype))

    def delta(self, x: Tensor) -> Tensor:
        """x [T, in] -> the scaled LoRA update [T, out] (routes, then the sparse or the dense path)."""
        routing = self.route(x)
        if self.kind != "ranks" and is_sparse(routing, self.num_experts):
            if x.shape[0] * routing.top_k <= self.sparse_max_slots:  # type: ignore[union-attr]
                return self.delta_sparse(x, routing)  # type: ignore[arg-type]
            if self.kind == "experts":
                return self.delta_grouped(x, routing)  # type: ignore[arg-type]
        return self.delta_dense(x, None if routing is None else dense_gates(routing, self.num_experts).to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]: the frozen base plus the routed LoRA update (routing per token)."""
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        out = y + self.delta(flat).reshape(*x.shape[:-1], -1).to(y.dtype)
        if self.localized_balance > 0 and self.training and self.last_routing is not None:
            g = dense_gates(self.last_routing, self.num_experts)
            self.last_aux["localized_balance"] = localized_balance_aux(
                g, tuple(x.shape[:-1]), self.sample_groups, groups=self.expert_groups, delta=self.balance_delta,
                coef=self.localized_balance, who="LoRAExperts")
        return out

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
