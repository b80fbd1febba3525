"""Capacity limits against a brute-force reference (hypothesis property test)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing import Routing
from moekit.routing.capacity import apply_capacity, capacity_keep_mask, expert_capacity


def naive_keep(ids: torch.Tensor, weights: torch.Tensor, C: int, priority: str) -> torch.Tensor:
    T, k = ids.shape
    slots = [(j, t) for j in range(k) for t in range(T)]  # slot-major
    if priority == "weight":
        slots.sort(key=lambda s: -float(weights[s[1], s[0]]))
    used: dict[int, int] = {}
    keep = torch.ones(T, k, dtype=torch.bool)
    for j, t in slots:
        e = int(ids[t, j])
        if e < 0:
            continue
        used[e] = used.get(e, 0) + 1
        keep[t, j] = used[e] <= C
    return keep


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 20), k=st.integers(1, 3), E=st.integers(3, 6), C=st.integers(1, 8),
    priority=st.sampled_from(["order", "weight"]), seed=st.integers(0, 10_000),
)
def test_keep_mask_matches_brute_force(T, k, E, C, priority, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < 0.1] = -1
    weights = torch.rand(T, k, generator=g)  # distinct almost surely: no ties in the weight order
    got = capacity_keep_mask(ids, weights, C, priority)
    assert torch.equal(got, naive_keep(ids, weights, C, priority))


def test_apply_capacity_drops_and_counts():
    ids = torch.tensor([[0], [0], [0], [1]])
    r = Routing(ids, torch.ones(4, 1), torch.zeros(4, 2), num_experts=2)
    out = apply_capacity(r, capacity_factor=1.0)  # C = ceil(1.0 * 4 * 1 / 2) = 2
    assert out.expert_ids.squeeze(1).tolist() == [0, 0, -1, 1]
    assert out.weights.squeeze(1).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert int(out.dropped) == 1
    assert out.stats()["dropped"] == 1.0


def test_expert_capacity_formula_and_errors():
    assert expert_capacity(1.25, 100, 2, 8) == math.ceil(1.25 * 100 * 2 / 8)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(0.0, 10, 1, 2)
    with pytest.raises(ValueError, match="priority"):
        capacity_keep_mask(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 1, "random")
