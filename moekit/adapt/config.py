"""The configuration of a mixture of LoRA experts: which linear layers, how many experts, which router.

Names and numbers only (CONVENTIONS 2), so it round-trips through `adapt_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moekit.utils.dataclass import from_dict_strict

KINDS = ("experts", "shared_a", "ranks", "ffn")


@dataclass
class AdaptConfig:
    """How `moekit.adapt.attach` wraps a model's linear layers.

    `kind` says what an expert is: "experts" (N LoRA pairs A_e [r, in], B_e [out, r]), "shared_a" (one A [r, in]
    and N heads B_e [out, r], HydraLoRA), "ranks" (one LoRA whose r ranks are the experts, SMoRA), "ffn" (the
    targets are feed-forward blocks with up_proj/down_proj (gate_proj optional) linears; expert e is the frozen
    block with LoRA on each projection, one router per block: MixLoRA).

    LoRAMoE's localized balancing constraint (`localized_balance` > 0) splits the experts into `expert_groups`
    contiguous groups and needs each training sample's group (`moekit.adapt.set_sample_groups`).
    """

    method: str = "lora"  # the registered method that made this config (for the record; `moekit.adapt.methods`)
    # names or dotted suffixes of nn.Linear modules, or "re:<regex>" (matching the whole name)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    kind: str = "experts"  # one of KINDS
    num_experts: int = 1  # N experts per wrapped layer (ignored for kind "ranks": the experts are the r ranks)
    rank: int = 8  # r, the LoRA rank of each expert
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / r
    router: str | None = None  # registered moekit router over the layer input; None: expert 0 always (plain LoRA)
    router_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the router (k, load_balance, ...)
    init_std: float | None = None  # std of A's normal init; None: Kaiming-uniform as peft. B starts at 0
    # linears given a plain LoRA (one expert, no router) besides the experts (MixLoRA's attention LoRA); [] = none
    lora_targets: list[str] = field(default_factory=list)
    expert_groups: int = 1  # G contiguous expert groups for the localized balancing constraint (LoRAMoE)
    localized_balance: float = 0.0  # LoRAMoE's beta: coefficient of the localized balancing constraint; 0 = off
    balance_delta: float = 0.1  # LoRAMoE's delta in [0, 1): weight 1 + delta on own-group experts, 1 - delta else

    def __post_init__(self) -> None:
        if not isinstance(self.targets, list) or not self.targets or not all(
            isinstance(t, str) and t for t in self.targets
        ):
            raise ValueError(f"AdaptConfig: targets must be a non-empty list of names or 're:' patterns, "
                             f"got {self.targets!r}")
        if self.kind not in KINDS:
            raise ValueError(f"AdaptConfig: kind must be one of {list(KINDS)}, got {self.kind!r}")
        for name in ("num_experts", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AdaptConfig: {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"AdaptConfig: alpha must be a finite number > 0, got {self.alpha!r}")
        if self.router is None and self.num_experts != 1 and self.kind != "ranks":
            raise ValueError(f"AdaptConfig: num_experts={self.num_experts} needs a router (router is None)")
        if self.router is None and self.kind == "ranks":
            raise ValueError("AdaptConfig: kind 'ranks' needs a router (it routes among the ranks)")
        if not isinstance(self.router_args, dict):
            raise ValueError(f"AdaptConfig: router_args must be a dict, got {type(self.router_args).__name__}")
        if not isinstance(self.lora_targets, list) or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"AdaptConfig: lora_targets must be a list of names or 're:' patterns, "
                             f"got {self.lora_targets!r}")
        g = self.expert_groups
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= self.routed_experts:
            raise ValueError(f"AdaptConfig: expert_groups must be an integer in [1, {self.routed_experts}] "
                             f"(the routed experts), got {g!r}")
        for name, hi in (("localized_balance", math.inf), ("balance_delta", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (0 <= v < hi):
                raise ValueError(f"AdaptConfig: {name} must be a number in [0, {hi}), got {v!r}")
        if self.localized_balance > 0 and self.router is None:
            raise ValueError("AdaptConfig: localized_balance > 0 needs a router (it balances the router's gates)")
        if self.init_std is not None and not (isinstance(self.init_std, int | float) and self.init_std > 0):
            raise ValueError(f"AdaptConfig: init_std must be None or a number > 0, got {self.init_std!r}")

    @property
    def scaling(self) -> float:
        """alpha / r."""
        return self.alpha / self.rank

    @property
    def routed_experts(self) -> int:
        """How many experts the router chooses among: r for kind "ranks", else num_experts."""
        return self.rank if self.kind == "ranks" else self.num_experts

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaptConfig:
        """Inverse of `to_dict`; an unknown key is an error naming it."""
        return from_dict_strict(cls, d)
