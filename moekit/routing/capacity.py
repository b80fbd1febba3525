"""Capacity limits: each expert keeps at most C token-slots; the rest become empty slots (-1).

C = ceil(capacity_factor * T * k / E) (Lepikhin et al. 2020, "GShard"; Fedus et al. 2021, "Switch
Transformers"). Priority "order" fills experts slot-major in token order (every token's first choice
before any second choice, as GShard); "weight" is Batch Prioritized Routing (Riquelme et al. 2021,
"Scaling Vision with Sparse Mixture of Experts"): highest router weight first.

Capacity makes a token's output depend on its batch-mates (Hayes et al. 2024, "Buffer Overflow in
Mixture of Experts"); dropless routing does not.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from moekit.routing.routing import Routing

PRIORITIES = ("order", "weight")


def expert_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * T * k / E), at least 1."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_keep_mask(expert_ids: Tensor, weights: Tensor, capacity: int, priority: str = "order") -> Tensor:
    """Bool [T, k]: True where the slot fits within its expert's capacity (empty slots stay True)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
    flat = expert_ids.t().reshape(-1)  # slot-major: all first choices, then all second choices
    n = flat.numel()
    if priority == "weight":
        pre = torch.argsort(-weights.t().reshape(-1).detach().float(), stable=True)
    else:
        pre = torch.arange(n, device=flat.device)
    f = flat[pre]
    order = torch.argsort(f, stable=True)
    sorted_ids = f[order]
    counts = torch.bincount(sorted_ids + 1)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each id
    rank = torch.arange(n, device=flat.device) - starts[sorted_ids + 1]
    keep_sorted = (rank < capacity) | (sorted_ids < 0)
    keep_flat = torch.empty_like(keep_sorted)
    keep_flat[pre[order]] = keep_sorted
    return keep_flat.reshape(expert_ids.shape[1], expert_ids.shape[0]).t()


def apply_capacity(routing: Routing, capacity_factor: float, priority: str = "order") -> Routing:
    """A copy of `routing` with slots over capacity emptied (-1, weight 0) and counted in `dropped`."""
    T, k = routing.expert_ids.shape
    C = expert_capacity(capacity_factor, T, k, routing.num_experts)
    keep = capacity_keep_mask(routing.expert_ids, routing.weights, C, priority)
    dropped = (~keep).sum()
    if routing.dropped is not None:
        dropped = dropped + routing.dropped
    return replace(
        routing,
        expert_ids=torch.where(keep, routing.expert_ids, -1),
        weights=torch.where(keep, routing.weights, torch.zeros_like(routing.weights)),
        dropped=dropped,
    )
