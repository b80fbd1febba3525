"""NAEE expert pruning (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping
for Mixture-of-Experts Large Language Models"): keep the subset of experts whose pruned layer reproduces
the layer's output best on calibration inputs,

    S* = argmin_{|S| = keep} mean_t || MoE_S(x_t) - MoE(x_t) ||_2^2,

where MoE_S is the layer after `keep_experts(S)` (it routes among the kept experts). The search is
exhaustive when there are at most `MAX_SUBSETS` candidate subsets, else greedy: remove, one at a time, the
expert whose removal raises the error least. The inputs are the calibration's subsample of the layer's
input rows, routed as independent rows (routers that need whole sequences see them as one sequence).
NAEE's dynamic skipping is in `moekit.compress.skip`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moekit.compress.calibrate import LayerStats
from moekit.compress.prune import register_method
from moekit.layers.moe import MoE
from moekit.layers.surgery import keep_experts

MAX_SUBSETS = 5000  # exhaustive search up to this many candidate subsets, greedy beyond


@torch.no_grad()
def reconstruction_error(layer: MoE, x: Tensor, ids: Sequence[int], reference: Tensor | None = None) -> float:
    """mean over rows of ||MoE_S(x) - MoE(x)||^2 for S = ids; x [N, D] (reference: MoE(x) [N, D] if known)."""
    if reference is None:
        reference = layer(x)[0]
    pruned = copy.deepcopy(layer)
    regroup = getattr(pruned.router, "regroup", None)  # e.g. DeepSeek's groups for this subset (as `prune` asks)
    keep_experts(pruned, list(ids), router_args=(regroup([[i] for i in ids]) or None) if regroup else None)
    return float((pruned(x)[0] - reference).float().pow(2).sum(-1).mean())


def search_subset(E: int, keep: int, protected: Sequence[int], error: Callable[[tuple[int, ...]], float],
                  *, max_subsets: int = MAX_SUBSETS) -> tuple[int, ...]:
    """The kept subset (sorted, `keep` ids, containing `protected`) minimising `error(subset)`: exhaustive
    over all candidates when there are at most `max_subsets`, else greedy removal. Ties: first in
    lexicographic order (exhaustive) or lowest expert id removed (greedy)."""
    fixed = set(protected)
    free = [e for e in range(E) if e not in fixed]
    need = keep - len(fixed)
    if need < 0:
        raise ValueError(f"search_subset: {len(fixed)} protected experts exceed the {keep} kept")
    if math.comb(len(free), need) <= max_subsets:
        best, best_err = None, math.inf
        for chosen in itertools.combinations(free, need):
            s = tuple(sorted(fixed | set(chosen)))
            err = error(s)
            if err < best_err:
                best, best_err = s, err
        assert best is not None
        return best
    current = list(range(E))
    while len(current) > keep:
        trials = [(error(tuple(e2 for e2 in current if e2 != e)), e) for e in current if e not in fixed]
        _, drop = min(trials)
        current.remove(drop)
    return tuple(current)


@register_method("naee", "keep the subset minimising the layer's output reconstruction error (NAEE)")
def naee(layer: MoE, stats: LayerStats, keep: int, protected: list[int]) -> list[int]:
    x = stats.inputs
    if x is None or not len(x):
        raise ValueError(f"naee: block {stats.block} has no calibration inputs (calibrate with record "
                         "including 'inputs')")
    p = next(layer.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    reference = layer(x)[0]
    return list(search_subset(layer.experts.num_experts, keep, protected,
                              lambda s: reconstruction_error(layer, x, s, reference)))
