"""Chain-of-Experts: the experts of one layer applied several times in sequence, re-routed each time.

Wang et al. 2025, "Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts Models"
(CoE). Instead of one parallel pass, a CoE layer iterates C times over the same experts, each
iteration with its own router reading the previous iteration's output:

    x^(0) = x,   x^(t) = sum_{i in top-k(g_t(x^(t-1)))} g_t,i(x^(t-1)) E_i(x^(t-1)) + x^(t-1),

so later experts see what earlier experts made of the token (the paper's "communication" between
experts) and the number of expert combinations grows. At equal compute CoE compares C iterations of
top-k with one pass of top-(C k). The paper finds independent routers per iteration and the inner
residual (the "+ x^(t-1)") both matter; both are what this layer does (`inner_residual=False`
drops the latter).

Contract: the layer returns y = x^(C) - x (the sum of the iterations' updates, so a transformer
block's own residual adds x once) and one `Routing` over all iterations: expert_ids / weights
[T, C k] (iteration t in slots t k .. t k + k - 1; a token may meet an expert in several
iterations), logits of the first iteration [T, E] with every iteration's in
`meta["iteration_logits"] [C, T, E]`, and aux losses summed over the iterations by name. A
router is a regular registered router (built by name), so any router can be chained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.routing.registry import router_config
from moekit.routing.routing import Routing


def merge_routings(routings: list[Routing]) -> Routing:
    """One Routing over several iterations: slots concatenated, aux summed by name, dropped summed."""
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


class ChainMoE(nn.Module):
    """An MoE layer that applies its experts `len(routers)` times, each time with its own router.

    Args:
        routers: one registered router per iteration (C = len(routers) >= 1), all over E experts.
        experts: an `Experts` module (or any module with `forward(x, routing)`), shared by the iterations.
        shared_experts: an optional always-on dense module applied once to the layer input.
        inner_residual: x^(t) = update + x^(t-1) (CoE) or x^(t) = update.

    With C = 1 and inner_residual this is exactly `MoE(router, experts, shared_experts)`.
    """

    def __init__(
        self,
        *,
        routers: list[nn.Module],
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        inner_residual: bool = True,
    ) -> None:
        super().__init__()
        if not routers:
            raise ValueError("ChainMoE: routers must hold at least one router (one per iteration)")
        e_experts = getattr(experts, "num_experts", None)
        for i, r in enumerate(routers):
            if e_experts is not None and getattr(r, "num_experts", e_experts) != e_experts:
                raise ValueError(
                    f"ChainMoE: router {i} routes over {r.num_experts} experts but experts has {e_experts}"
                )
        self.routers = nn.ModuleList(routers)
        self.experts = experts
        self.shared_experts = shared_experts
        self.inner_residual = inner_residual

    @property
    def router(self) -> nn.Module:
        """The first iteration's router (what analysis tools that expect `moe.router` look at)."""
        return self.routers[0]

    @property
    def iterations(self) -> int:
        """C, the number of iterations."""
        return len(self.routers)

    def forward(self, x: Tensor, *, state: dict | None = None) -> tuple[Tensor, Routing]:
        """x: [T, D] or [B, L, D] -> (y of the same shape, Routing over the B*L tokens with C*k slots)."""
        shape = x.shape
        if x.dim() == 3:
            state = dict(state or {})
            state["seq_len"] = shape[1]
        elif x.dim() != 2:
            raise ValueError(f"ChainMoE: expected input [T, D] or [B, L, D], got shape {tuple(shape)}")
        if state and isinstance(state.get("token_ids"), Tensor):
            state = {**state, "token_ids": state["token_ids"].reshape(-1)}
        flat = x.reshape(-1, shape[-1])  # [T, D]
        h = flat
        routings = []
        for router in self.routers:
            routing = router(h, state=state)
            update = self.experts(h, routing)  # [T, D]
            h = update + h if self.inner_residual else update
            routings.append(routing)
            if routing.state is not None:
                state = {**(state or {}), "prev": routing.state}
        y = h - flat if self.inner_residual else h
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.reshape(shape), merge_routings(routings)

    def config(self) -> dict[str, Any]:
        """JSON-ready description (routers by registered name and args; experts' args)."""
        return {
            "routers": [router_config(r) for r in self.routers],
            "experts": self.experts.config() if hasattr(self.experts, "config") else None,
            "shared_experts": self.shared_experts.config() if self.shared_experts is not None else None,
            "inner_residual": self.inner_residual,
        }
