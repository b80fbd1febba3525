"""`LoRAFFNExperts`: a frozen feed-forward block whose experts are the block itself with LoRA on its projections,
one router per block — MixLoRA's layout.

Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts"
(arXiv:2404.15159): expert e is the frozen FFN with LoRA deltas on gate/up/down,

    E_e(x) = (W_down + s B^d_e A^d_e) [ act((W_gate + s B^g_e A^g_e) x) * ((W_up + s B^u_e A^u_e) x) ]
    y      = sum_{e in topk} g_e(x) E_e(x)

with s = alpha / r and g(x) one top-k router over the block input. The frozen parts are computed once per token:
W_gate x and W_up x are shared by the experts, and W_down is linear, so sum_e g_e W_down h_e = W_down (sum_e g_e
h_e) (its bias is added sum_e g_e times). Works on any module with `up_proj`/`down_proj` linears (`gate_proj`
optional: act(W_up x) when absent) and an activation as `act_fn` (transformers' Llama/Qwen2/Mistral MLP) or
`act` (moekit's `MLP`).

Paths as in `moekit.adapt.layer`: the dense path computes every expert's hidden [T, E, F] (the reference; soft
routers); the sparse path gathers the k chosen experts' A and B per token ([T, k, ...]) when k < E and
T * k <= `sparse_max_slots` (generation); the grouped path (k < E, more token-slots: training) sorts the
token-slots by expert and runs each expert's LoRAs on its rows only ([T * k, F] hidden states instead of [T, E, F]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.adapt.balance import localized_balance_aux
from moekit.adapt.layer import dense_gates, grouped_rows, is_sparse, per_expert, routing_slots
from moekit.routing.registry import build_router
from moekit.routing.routing import Routing

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_ffn_block(module: nn.Module) -> bool:
    """Whether `module` looks like a (gated) MLP block `LoRAFFNExperts` can wrap: linear `up_proj` and `down_proj`,
    optional linear `gate_proj`, and an activation `act_fn` or `act`."""
    linear = all(isinstance(getattr(module, p, None), nn.Linear) for p in ("up_proj", "down_proj"))
    gate = getattr(module, "gate_proj", None)
    return linear and (gate is None or isinstance(gate, nn.Linear)) and callable(_activation(module))


def _activation(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    act = getattr(module, "act_fn", None)
    return act if act is not None else getattr(module, "act", None)


class ExpertLoRA(nn.Module):
    """N LoRA pairs of one projection (no base, no router): `lora_A [E, r, in]`, `lora_B [E, out, r]` (B = 0)."""

    def __init__(self, *, base: nn.Linear, num_experts: int, rank: int, init_std: float | None) -> None:
        super().__init__()
        out_f, in_f = base.weight.shape
        if rank > min(in_f, out_f):
            raise ValueError(f"LoRAFFNExperts: rank={rank} is larger than the layer ({out_f} x {in_f}); "
                             f"use rank <= {min(in_f, out_f)}")
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_f, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, rank, dtype=w.dtype, device=w.device))
        for a in self.lora_A:
            if init_std is None:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=init_std)

    def dense(self, x: Tensor) -> Tensor:
        """x [T, in] (shared) or [T, E, in] (per expert) -> B_e A_e x for every expert [T, E, out]."""
        h = torch.einsum("ti,eri->ter" if x.dim() == 2 else "tei,eri->ter", x, self.lora_A)
        return torch.einsum("ter,eor->teo", h, self.lora_B)

    def chosen(self, x: Tensor, ids: Tensor) -> Tensor:
        """x [T, in] (shared) or [T, k, in] (per slot), ids [T, k] -> B_ids A_ids x [T, k, out] (only those)."""
        x = x[:, None, :, None] if x.dim() == 2 else x[..., None]  # [T, 1 or k, in, 1]
        h = self.lora_A[ids] @ x  # A[ids] [T, k, r, in] -> [T, k, r, 1]
        return (self.lora_B[ids] @ h).squeeze(-1)  # B[ids] [T, k, out, r] -> [T, k, out]


class LoRAFFNExperts(nn.Module):
    """A wrapped FFN block: `base` (frozen), `gate_proj`/`up_proj`/`down_proj` (`ExpertLoRA`, gate only when the
    block is gated) and one `router` over the block input (None: one expert, weight 1).

    Like `LoRAExperts` it keeps `last_aux`, `last_routing` and `sample_groups`, and `mergeable` is False."""

    mergeable = False
    sparse_max_slots: int = 256  # the sparse path runs when T * k <= this (and k < E)

    def __init__(
        self,
        *,
        base: nn.Module,
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
        if not is_ffn_block(base):
            raise TypeError(f"LoRAFFNExperts: base must be an MLP block with up_proj/down_proj linears (gate_proj "
                            f"optional) and an activation act_fn or act, got {type(base).__name__}")
        if router is None and num_experts != 1:
            raise ValueError(f"LoRAFFNExperts: num_experts={num_experts} needs a router")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.kind, self.rank, self.scaling, self.num_experts = "ffn", rank, alpha / rank, num_experts
        self.gated = getattr(base, "gate_proj", None) is not None
        for name in PROJECTIONS if self.gated else PROJECTIONS[1:]:
            setattr(self, name, ExpertLoRA(base=getattr(base, name), num_experts=num_experts, rank=rank,
                                           init_std=init_std))
        w = base.down_proj.weight
        self.router = None if router is None else build_router(
            router, dim=base.up_proj.in_features, num_experts=num_experts, **router_args).to(device=w.device,
                                                                                             dtype=w.dtype)
        self.expert_groups, self.localized_balance, self.balance_delta = expert_groups, localized_balance, balance_delta
        self.sample_groups: Tensor | None = None
        self.last_aux: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    def route(self, x: Tensor) -> Routing | None:
        """x [T, D] -> the router's Routing (None without a router); stores it and its aux losses."""
        routing = None if self.router is None else self.router(x)
        self.last_routing = routing
        self.last_aux = {} if routing is None else dict(routing.aux)
        return routing

    def _mix(self, x: Tensor, w: Tensor, lora: Callable[[ExpertLoRA, Tensor], Tensor]) -> Tensor:
        """x [T, D], slot weights w [T, S] and `lora(proj, input)` giving [T, S, out] -> y [T, D]."""
        base, s = self.base, self.scaling
        up = base.up_proj(x)[:, None, :] + s * lora(self.up_proj, x)  # [T, S, F]
        if self.gated:
            h = _activation(base)(base.gate_proj(x)[:, None, :] + s * lora(self.gate_proj, x)) * up
        else:
            h = _activation(base)(up)
        w = w.to(h.dtype)
        y = base.down_proj(torch.einsum("ts,tsf->tf", w, h))  # W_down (sum_e g_e h_e) + b
        if base.down_proj.bias is not None:
            y = y + (w.sum(-1, keepdim=True) - 1) * base.down_proj.bias  # the bias sum_e g_e times
        return y + s * torch.einsum("ts,tso->to", w, lora(self.down_proj, h))

    def forward_dense(self, x: Tensor, routing: Routing | None) -> Tensor:
        """x [T, D] -> y [T, D], every expert computed and weighted by its gate (the reference path)."""
        w = x.new_ones(x.shape[0], 1) if routing is None else dense_gates(routing, self.num_experts)
        return self._mix(x, w, lambda proj, inp: proj.dense(inp))

    def forward_sparse(self, x: Tensor, routing: Routing | None) -> Tensor:
        """x [T, D] -> y [T, D], only the k chosen experts of each token computed."""
        if routing is None:
            ids, w = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device), x.new_ones(x.shape[0], 1)
        else:
            ids, w = routing_slots(routing)
        return self._mix(x, w, lambda proj, inp: proj.chosen(inp, ids))

    def forward_grouped(self, x: Tensor, routing: Routing) -> Tensor:
        """x [T, D] -> y [T, D]: token-slots sorted by expert, each expert's LoRAs applied to its own rows."""
        base, s = self.base, self.scaling
        tok, w, counts = grouped_rows(routing, self.num_experts)  # [R], [R], [E]
        xr = x[tok]  # [R, D]

        def lora(proj: ExpertLoRA, inp: Tensor) -> Tensor:
            return per_expert(inp, counts, lambda e, v: (v @ proj.lora_A[e].T) @ proj.lora_B[e].T)

        up = base.up_proj(x)[tok] + s * lora(self.up_proj, xr)  # [R, F]
        h = _activation(base)(base.gate_proj(x)[tok] + s * lora(self.gate_proj, xr)) * up if self.gated else \
            _activation(base)(up)
        wr = w[:, None].to(h.dtype)
        y = base.down_proj(h.new_zeros(x.shape[0], h.shape[1]).index_add(0, tok, wr * h))
        if base.down_proj.bias is not None:
            y = y + (routing_slots(routing)[1].to(y.dtype).sum(-1, keepdim=True) - 1) * base.down_proj.bias
        return y + s * y.new_zeros(y.shape).index_add(0, tok, wr * lora(self.down_proj, h))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]: the routed mixture of expert FFNs (routing per token)."""
        flat = x.reshape(-1, x.shape[-1])
        routing = self.route(flat)
        if not is_sparse(routing, self.num_experts):
            y = self.forward_dense(flat, routing)
        elif flat.shape[0] * routing.top_k <= self.sparse_max_slots:  # type: ignore[union-attr]
            y = self.forward_sparse(flat, routing)
        else:
            y = self.forward_grouped(flat, routing)  # type: ignore[arg-type]
        if self.localized_balance > 0 and self.training and routing is not None:
            self.last_aux["localized_balance"] = localized_balance_aux(
                dense_gates(routing, self.num_experts), tuple(x.shape[:-1]), self.sample_groups,
                groups=self.expert_groups, delta=self.balance_delta, coef=self.localized_balance,
                who="LoRAFFNExperts")
        return y.reshape(x.shape).to(x.dtype)

    @property
    def router_name(self) -> str | None:
        return None if self.router is None else type(self.router).router_name  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return f"gated={self.gated}, experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}"
