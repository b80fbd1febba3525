"""The MoE layer: a router, experts, optional shared experts, passed in (DESIGN.md, contract 4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.mlp import MLP
from moekit.routing.capacity import PRIORITIES, apply_capacity
from moekit.routing.registry import router_config, router_from_config
from moekit.routing.routing import Routing


def _weight_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The dtype a part's input must have: its `weight_dtype` where it declares one (Experts, MLP: one
    attribute read), else its first floating-point parameter's (None: no part, or no such parameter)."""
    if module is None:
        return None
    declared = getattr(module, "weight_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class MoE(nn.Module):
    """y = sum_slots weight * expert(x) [+ shared(x), optionally times sigmoid(shared_gate(x))].

    Args:
        router: a registered router (`forward(x [T, D], *, state) -> Routing`).
        experts: an `Experts` module (or any module with `forward(x, routing)`).
        shared_experts: an optional always-on dense module (DeepSeekMoE, Qwen2-MoE), e.g. `MLP`.
        shared_gate: multiply the shared output by sigmoid(x @ w) with a learned w [1, D] (Qwen2-MoE's
            `shared_expert_gate`).
        capacity_factor: if set, cap each expert at ceil(cf * T * k / E) token-slots after routing;
            overflow slots are dropped (-1) and counted. None (default) is dropless.
        capacity_priority: "order" or "weight" (which slots win when an expert overflows).

    Null experts (AdaMoE) need no layer support: a router that picks one returns a -1 slot, which
    costs no compute and contributes zero.
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        shared_gate: bool = False,
        capacity_factor: float | None = None,
        capacity_priority: str = "order",
    ) -> None:
        super().__init__()
        if shared_gate and shared_experts is None:
            raise ValueError("MoE: shared_gate=True needs shared_experts")
        if capacity_priority not in PRIORITIES:
            raise ValueError(f"MoE: capacity_priority must be one of {list(PRIORITIES)}, got {capacity_priority!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 or None, got {capacity_factor!r}")
        if capacity_factor is not None and getattr(router, "capacity_factor", None) is not None:
            raise ValueError(
                f"MoE: router {type(router).__name__} already limits capacity (capacity_factor="
                f"{router.capacity_factor}); set capacity on the router or on the layer, not both"
            )
        r_experts, e_experts = getattr(router, "num_experts", None), getattr(experts, "num_experts", None)
        if r_experts is not None and e_experts is not None and r_experts != e_experts:
            raise ValueError(f"MoE: router routes over {r_experts} experts but experts has {e_experts}")
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_expert_gate = nn.Linear(router.dim, 1, bias=False) if shared_gate else None
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority

    def forward(self, x: Tensor, *, state: dict | None = None) -> tuple[Tensor, Routing]:
        """x: [T, D] or [B, L, D] -> (y of the same shape, Routing over the B*L tokens).

        For [B, L, D] inputs `state["seq_len"] = L` is set for sequence-level losses; `state["token_ids"]`
        of shape [B, L] is flattened to [B*L].
        """
        shape = x.shape
        if x.dim() == 3:
            state = dict(state or {})
            state["seq_len"] = shape[1]
        elif x.dim() != 2:
            raise ValueError(f"MoE: expected input [T, D] or [B, L, D], got shape {tuple(shape)}")
        # The router may differ (routers cast their input to their own weights' dtype); the experts may not.
        check_input_dtype("MoE (experts)", x, _weight_dtype(self.experts))
        check_input_dtype("MoE (shared experts)", x, _weight_dtype(self.shared_experts))
        if state and isinstance(state.get("token_ids"), Tensor):
            state = {**state, "token_ids": state["token_ids"].reshape(-1)}
        flat = x.reshape(-1, shape[-1])  # [T, D]
        routing = self.router(flat, state=state)
        if self.capacity_factor is not None:
            routing = apply_capacity(routing, self.capacity_factor, self.capacity_priority)
        if getattr(self.experts, "sequence_aware", False):  # e.g. Hecto's GRU expert: needs sequences and cache
            ctx = state or {}
            y = self.experts(
                flat,
                routing,
                seq_len=shape[1] if x.dim() == 3 else None,
                cache=ctx.get("cache"),
                layer=ctx.get("layer"),
            )  # [T, D]
        else:
            y = self.experts(flat, routing)  # [T, D]
        if self.shared_experts is not None:
            s = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(flat)) * s
            y = y + s
        return y.reshape(shape), routing

    def config(self) -> dict[str, Any]:
        """JSON-ready description: router by registered name and args, experts and shared expert args."""
        shared = self.shared_experts
        if shared is not None and not isinstance(shared, MLP):
            raise TypeError("MoE.config: only MLP shared experts are serialisable")
        if not isinstance(self.experts, Experts):
            raise TypeError("MoE.config: only Experts modules are serialisable")
        return {
            "router": router_config(self.router),
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
        return cls(
            router=router_from_config(config["router"]),
            experts=Experts(**config["experts"]),
            shared_experts=MLP(**shared) if shared else None,
            shared_gate=config.get("shared_gate", False),
            capacity_factor=config.get("capacity_factor"),
            capacity_priority=config.get("capacity_priority", "order"),
        )
