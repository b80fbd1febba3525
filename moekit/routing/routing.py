"""The `Routing` contract: what every router returns (DESIGN.md, contract 1), and the `RoutingContext`
a router may read besides its input rows (contract 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        state: router-private recurrent state the next MoE layer's router reads (the recurrent router's
            GRU state h [T, H]), or None. It reaches that router as `RoutingContext.previous.state`.
    """

    expert_ids: Tensor
    weights: Tensor
    logits: Tensor
    num_experts: int
    aux: dict[str, Tensor] = field(default_factory=dict)
    dropped: Tensor | None = None
    meta: dict[str, Tensor] = field(default_factory=dict)
    state: Tensor | None = None

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


@dataclass(slots=True)
class RoutingContext:
    """What a router may know about its `T` input rows besides the rows themselves (DESIGN.md, contract 2).

    Built once per model forward (`MoELM`, a patched Hugging Face model) or by `MoE.forward` from its
    arguments; routers read it and never change it (`dataclasses.replace` makes a changed copy). The KV
    cache and the block index are not here: routers do not see them (experts that need them declare
    it in their `forward` signature, see `MoE`).

    Attributes:
        seq_len: the rows are T // seq_len sequences of seq_len consecutive tokens (`MoE` sets it for a
            [B, L, D] input); None: unknown, one sequence of T.
        token_ids: LongTensor [T], the token id of each row (routers that route by id, e.g. `hash`).
        previous: the `Routing` of the MoE layer (or Chain-of-Experts iteration) before this one, over the
            same rows, when it handed on a recurrent state (`Routing.state`); None for the first layer.
        uncond: bool [T], rows flagged unconditional (the `prototype` router's `num_uncond` experts).
        token_index: LongTensor [T], which of the batch's B*L tokens each row is when a layer routes a
            subset of them (a mixture-of-depths block); None: all of them, in order. Read by traces.
    """

    seq_len: int | None = None
    token_ids: Tensor | None = None
    previous: Routing | None = None
    uncond: Tensor | None = None
    token_index: Tensor | None = None

    @property
    def previous_state(self) -> Tensor | None:
        """The recurrent state the previous layer's router handed on (`previous.state`), or None."""
        return self.previous.state if self.previous is not None else None
