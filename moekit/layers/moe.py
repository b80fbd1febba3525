"""The MoE layer: a router, experts, optional shared experts, passed in (DESIGN.md, contract 4).

Chain-of-Experts (Wang et al. 2025, "Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models", CoE) is the same layer with one router per iteration: the experts are
applied C times in sequence, each iteration re-routed on the previous one's output,

    x^(0) = x,   x^(t) = sum_{i in top-k(g_t(x^(t-1)))} g_t,i(x^(t-1)) E_i(x^(t-1)) + x^(t-1),

so later experts see what earlier experts made of the token. The paper finds independent routers per
iteration and the inner residual (the "+ x^(t-1)") both matter; `inner_residual=False` drops the latter.
The layer then returns y = x^(C) - x (the sum of the iterations' updates, so a transformer block's own
residual adds x once) and one `Routing` over all iterations (`merge_routings`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.mlp import MLP
from moekit.routing.capacity import PRIORITIES, apply_capacity
from moekit.routing.registry import router_config, router_from_config
from moekit.routing.routing import Routing, RoutingContext

# Keywords an experts module may take besides (x, routing); it asks for one by naming it in its
# `forward` signature, and `MoE` passes exactly those (routers never see the cache or the layer index):
#   seq_len: the rows are sequences of this many consecutive tokens (None: one sequence);
#   cache, layer: the model's KV cache and block index, for a state kept across calls (Hecto's GRU);
#   iteration: the Chain-of-Experts iteration (0 in a plain layer), so such a state is kept per iteration.
EXPERTS_KEYWORDS = ("seq_len", "cache", "layer", "iteration")


@functools.cache
def experts_keywords(cls: type) -> tuple[str, ...]:
    """The `EXPERTS_KEYWORDS` that `cls.forward` accepts (read once per class)."""
    params = inspect.signature(cls.forward).parameters
    return tuple(name for name in EXPERTS_KEYWORDS if name in params)


def _weight_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The dtype a part's input must have: its `weight_dtype` where it declares one (Experts, MLP: one
    attribute read), else its first floating-point parameter's (None: no part, or no such parameter)."""
    if module is None:
        return None
    declared = getattr(module, "weight_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def layer_context(x: Tensor, context: RoutingContext | None, token_ids: Tensor | None) -> RoutingContext:
    """The context the routers of a layer see for input x [T, D] or [B, L, D]: `seq_len` = L for a 3-d
    input, token ids flattened to [T]. Returns `context` itself when nothing changes (a model builds one
    context per forward and its layers reuse it)."""
    if token_ids is not None and context is not None and context.token_ids is not None:
        raise ValueError("MoE: token ids given twice (token_ids= and context.token_ids); pass one")
    if token_ids is None and context is not None:
        token_ids = context.token_ids
    if isinstance(token_ids, Tensor) and token_ids.dim() != 1:
        token_ids = token_ids.reshape(-1)  # [B, L] -> [T]
    if x.dim() == 3:
        seq_len = x.shape[1]
    else:
        seq_len = context.seq_len if context is not None else None
    if context is None:
        return RoutingContext(seq_len=seq_len, token_ids=token_ids)
    if context.seq_len == seq_len and context.token_ids is token_ids:
        return context
    return replace(context, seq_len=seq_len, token_ids=token_ids)


def merge_routings(routings: list[Routing]) -> Routing:
    """One Routing over several Chain-of-Experts iterations: slots side by side ([T, C k], iteration t in
    slots t k .. t k + k - 1), the first iteration's logits with every iteration's in
    `meta["iteration_logits"] [C, T, E]`, aux losses summed by name, `dropped` summed, the last `state`."""
    first = routings[0]
    aux: dict[str, Tensor] = {}
    for r in routings:
        for name, v in r.aux.items():
            aux[name] = aux[name] + v if name in aux else v
    dropped = [r.dropped for r in routings if r.dropped is not None]
    return Routing(
        torch.cat([r.expert_ids for r in routings], dim=1),
        torch.cat([r.weights for r in routings], dim=1),
        first.logits,
        first.num_experts,
        aux=aux,
        dropped=torch.stack(dropped).sum() if dropped else None,
        meta={"iteration_logits": torch.stack([r.logits for r in routings])},
        state=routings[-1].state,
    )


class MoE(nn.Module):
    """y = sum_slots weight * expert(x) [+ shared(x), optionally times sigmoid(shared_gate(x))].

    Args:
        router: a registered router (`forward(x [T, D], *, context) -> Routing`), or a sequence of C
            routers: a Chain-of-Experts layer that applies its experts C times, iteration t routed by
            router t (registered as `routers.{t}`, the checkpoint names of Chain-of-Experts layers).
        experts: an `Experts` module (or any module with `forward(x, routing)`; it may also take the
            `EXPERTS_KEYWORDS` it names in its signature).
        shared_experts: an optional always-on dense module (DeepSeekMoE, Qwen2-MoE), e.g. `MLP`, applied
            once to the layer input.
        shared_gate: multiply the shared output by sigmoid(x @ w) with a learned w [1, D] (Qwen2-MoE's
            `shared_expert_gate`).
        capacity_factor: if set, cap each expert at ceil(cf * T * k / E) token-slots after routing (each
            iteration on its own); overflow slots are dropped (-1) and counted. None (default) is dropless.
        capacity_priority: "order" or "weight" (which slots win when an expert overflows).
        inner_residual: Chain-of-Experts only: x^(t) = update + x^(t-1) (CoE) or x^(t) = update.

    `router` is the (first iteration's) router, `routers` all of them, `iterations` their number C.
    Null experts (AdaMoE) need no layer support: a router that picks one returns a -1 slot, which
    costs no compute and contributes zero.
    """

    def __init__(
        self,
        *,
        router: nn.Module | Sequence[nn.Module],
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        shared_gate: bool = False,
        capacity_factor: float | None = None,
        capacity_priority: str = "order",
        inner_residual: bool = True,
    ) -> None:
        super().__init__()
        routers = (router,) if isinstance(router, nn.Module) else tuple(router)
        if not routers:
            raise ValueError("MoE: router must be a router or a non-empty sequence of routers (one per iteration)")
        if shared_gate and shared_experts is None:
            raise ValueError("MoE: shared_gate=True needs shared_experts")
        if capacity_priority not in PRIORITIES:
            raise ValueError(f"MoE: capacity_priority must be one of {list(PRIORITIES)}, got {capacity_priority!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 or None, got {capacity_factor!r}")
        e_experts = getattr(experts, "num_experts", None)
        for i, r in enumerate(routers):
            which = f"router {i}" if len(routers) > 1 else "router"
            if capacity_factor is not None and getattr(r, "capacity_factor", None) is not None:
                raise ValueError(
                    f"MoE: {which} {type(r).__name__} already limits capacity (capacity_factor="
                    f"{r.capacity_factor}); set capacity on the router or on the layer, not both"
                )
            r_experts = getattr(r, "num_experts", None)
            if r_experts is not None and e_experts is not None and r_experts != e_experts:
                raise ValueError(f"MoE: {which} routes over {r_experts} experts but experts has {e_experts}")
        if isinstance(router, nn.Module):
            self.router = router
        else:
            self.routers = nn.ModuleList(routers)
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_expert_gate = nn.Linear(routers[0].dim, 1, bias=False) if shared_gate else None
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority
        self.inner_residual = inner_residual

    # `router` / `routers` read the registered module(s): one `router`, or a Chain-of-Experts `routers` list.
    @property
    def router(self) -> nn.Module:
        """The router (the first iteration's in a Chain-of-Experts layer)."""
        m = self._modules
        return m["router"] if "router" in m else m["routers"][0]

    @property
    def routers(self) -> tuple[nn.Module, ...]:
        """Every iteration's router, in order (one for a plain layer)."""
        m = self._modules
        return tuple(m["routers"]) if "routers" in m else (m["router"],)

    @property
    def iterations(self) -> int:
        """C, the number of times the experts are applied (1 for a plain layer)."""
        m = self._modules
        return len(m["routers"]) if "routers" in m else 1

    def forward(
        self,
        x: Tensor,
        *,
        context: RoutingContext | None = None,
        token_ids: Tensor | None = None,
        cache: Any = None,
        layer: int | None = None,
    ) -> tuple[Tensor, Routing]:
        """x: [T, D] or [B, L, D] -> (y of the same shape, Routing over the B*L tokens; C k slots for C
        iterations).

        context: what the routers may read (`RoutingContext`); for a [B, L, D] input its `seq_len` is L.
        token_ids: [B, L] or [T] ids, for routers that route by token id (or put them in `context`).
        cache, layer: the KV cache and block index, passed only to experts that ask for them (Hecto).
        """
        shape = x.shape
        if x.dim() not in (2, 3):
            raise ValueError(f"MoE: expected input [T, D] or [B, L, D], got shape {tuple(shape)}")
        # The router may differ (routers cast their input to their own weights' dtype); the experts may not.
        check_input_dtype("MoE (experts)", x, _weight_dtype(self.experts))
        check_input_dtype("MoE (shared experts)", x, _weight_dtype(self.shared_experts))
        context = layer_context(x, context, token_ids)
        flat = x.reshape(-1, shape[-1])  # [T, D]
        keywords = experts_keywords(type(self.experts))
        if self.iterations == 1:
            routing = self._route(self.router, flat, context)
            y = self._experts(flat, routing, keywords, context, cache, layer, 0)  # [T, D]
        else:
            h, routings = flat, []
            for t, router in enumerate(self.routers):
                routing = self._route(router, h, context)
                update = self._experts(h, routing, keywords, context, cache, layer, t)  # [T, D]
                h = update + h if self.inner_residual else update
                routings.append(routing)
                if routing.state is not None:  # a recurrent router hands its state to the next iteration
                    context = replace(context, previous=routing)
            y = h - flat if self.inner_residual else h
            routing = merge_routings(routings)
        if self.shared_experts is not None:
            s = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(flat)) * s
            y = y + s
        return y.reshape(shape), routing

    def _route(self, router: nn.Module, h: Tensor, context: RoutingContext) -> Routing:
        routing = router(h, context=context)
        if self.capacity_factor is not None:
            routing = apply_capacity(routing, self.capacity_factor, self.capacity_priority)
        return routing

    def _experts(
        self,
        h: Tensor,
        routing: Routing,
        keywords: tuple[str, ...],
        context: RoutingContext,
        cache: Any,
        layer: int | None,
        iteration: int,
    ) -> Tensor:
        if not keywords:
            return self.experts(h, routing)
        given = {"seq_len": context.seq_len, "cache": cache, "layer": layer, "iteration": iteration}
        return self.experts(h, routing, **{name: given[name] for name in keywords})

    def config(self) -> dict[str, Any]:
        """JSON-ready description: router(s) by registered name and args, experts and shared expert args."""
        shared = self.shared_experts
        if shared is not None and not isinstance(shared, MLP):
            raise TypeError("MoE.config: only MLP shared experts are serialisable")
        if not isinstance(self.experts, Experts):
            raise TypeError("MoE.config: only Experts modules are serialisable")
        routers: dict[str, Any]
        if "routers" in self._modules:
            routers = {"routers": [router_config(r) for r in self.routers], "inner_residual": self.inner_residual}
        else:
            routers = {"router": router_config(self.router)}
        return {
            **routers,
            "experts": self.experts.config(),
            "shared_experts": shared.config() if shared is not None else None,
            "shared_gate": self.shared_expert_gate is not None,
            "capacity_factor": self.capacity_factor,
            "capacity_priority": self.capacity_priority,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoE:
        """Build an MoE layer (fresh weights) from `config()` output."""
        shared = config.get("shared_experts")
        if "routers" in config:
            router: nn.Module | list[nn.Module] = [router_from_config(c) for c in config["routers"]]
        else:
            router = router_from_config(config["router"])
        return cls(
            router=router,
            experts=Experts(**config["experts"]),
            shared_experts=MLP(**shared) if shared else None,
            shared_gate=config.get("shared_gate", False),
            capacity_factor=config.get("capacity_factor"),
            capacity_priority=config.get("capacity_priority", "order"),
            inner_residual=config.get("inner_residual", True),
        )
