"""The `Routing` contract: what every router returns (see DESIGN.md, contract 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Routing:
    """Routing decisions for `T` tokens over `E` experts with at most `k` choices per token.

    Attributes:
        expert_ids: LongTensor [T, k]; chosen experts in [0, E), -1 marks an empty slot (a dropped
            token, a null expert, or unused room when the number of experts per token varies).
        weights: Tensor [T, k]; mixing weight of each slot, 0 where the slot is empty.
        logits: Tensor [T, E']; the router's raw scores (E' = E, or E + N with N null experts).
        num_experts: E, the number of real experts the ids index.
        aux: auxiliary losses already scaled by their coefficients (`load_balance`, `z_loss`, ...).
        dropped: LongTensor scalar; what the router wanted but could not place: token-slots over
            capacity (switch, capacity-limited layers), or tokens no expert chose (expert_choice).
        meta: router-specific tensors (e.g. `null_weight` for null experts).
        state: what the next layer's router needs from this one (recurrent routers), or None.
    """

    expert_ids: Tensor
    weights: Tensor
    logits: Tensor
    num_experts: int
    aux: dict[str, Tensor] = field(default_factory=dict)
    dropped: Tensor | None = None
    meta: dict[str, Tensor] = field(default_factory=dict)
    state: Any = None

    def __post_init__(self) -> None:
        if self.expert_ids.dim() != 2 or self.expert_ids.shape != self.weights.shape:
            raise ValueError(
                f"Routing: expert_ids and weights must both be [T, k]; got {tuple(self.expert_ids.shape)} "
                f"and {tuple(self.weights.shape)}"
            )
        if self.expert_ids.dtype != torch.long:
            raise TypeError(f"Routing.expert_ids must be int64, got {self.expert_ids.dtype}")

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        """k, the number of slots per token."""
        return self.expert_ids.shape[1]

    def total_aux(self) -> Tensor:
        """Sum of the auxiliary losses (0 when there are none)."""
        if not self.aux:
            return self.weights.new_zeros(())
        return torch.stack([v.reshape(()) for v in self.aux.values()]).sum()

    # Stats: computed on demand from the decisions, so the hot path pays nothing for them.
    def tokens_per_expert(self) -> Tensor:
        """LongTensor [E]: number of token-slots sent to each expert."""
        ids = self.expert_ids.reshape(-1)
        return torch.bincount(ids[ids >= 0], minlength=self.num_experts)

    def active_per_token(self) -> Tensor:
        """Tensor [T]: number of real experts that process each token."""
        return (self.expert_ids >= 0).sum(dim=1)

    def stats(self) -> dict[str, float]:
        """Summary numbers: mean active experts per token, max/mean load, `dropped` as reported by
        the router (and its share of the T*k slots), and tokens left with no expert at all."""
        load = self.tokens_per_expert().float()
        mean = load.mean().clamp_min(1e-9)
        dropped = int(self.dropped) if self.dropped is not None else 0
        slots = self.num_tokens * self.top_k
        return {
            "active_per_token": float(self.active_per_token().float().mean()) if self.num_tokens else 0.0,
            "max_over_mean_load": float(load.max() / mean) if self.num_experts else 0.0,
            "dropped": float(dropped),
            "dropped_frac": dropped / slots if slots else 0.0,
            "tokens_without_expert": float((self.active_per_token() == 0).sum()),
        }
