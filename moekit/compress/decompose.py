"""Expert decomposition: a shared base plus low-rank per-expert deltas, by SVD.

After D^2-MoE (Gu et al. 2025, "Delta Decompression for MoE-based LLMs Compression"): each projection of
each expert is written W_e = W_mean + Delta_e, the base W_mean the mean of the layer's experts, and the delta
truncated to rank r by its SVD, Delta_e ~ U_e S_e V_e^T (S folded into U). The base is stored once per layer,
so a layer of E experts holding N x K matrices costs N K + E r (N + K) instead of E N K. Differences from the
paper: the base is the plain mean (not Fisher-weighted), the SVD is plain (not truncation-aware), and the base
is not pruned.

Rank budget: `rank=r` gives every MoE layer rank r; `ratio=q` removes the fraction q of the routed experts'
parameters, and the ranks are allocated across layers greedily by squared singular value per parameter (each
step adds one rank to the layer whose next singular values remove the most squared Frobenius error per
parameter they cost; the squared error of a truncation is the sum of the dropped squared singular values, and
they decrease with rank, so the greedy allocation is optimal for the total error at each budget it reaches).

The result is stored as `LowRankExperts` (experts variant "lowrank"): a real module that computes base +
delta without forming full expert weights, saved and loaded by moekit checkpoints (`model.config.experts`
becomes "lowrank" with the per-block ranks in `experts_args`); `materialize()` gives plain `Experts` back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import moe_layers
from moekit.layers.experts import Experts
from moekit.layers.lowrank import LowRankExperts, max_rank


@dataclass
class DecomposeResult:
    """What `decompose` did."""

    method: str
    ranks: dict[int, int]  # block -> rank of the deltas
    ratio: float | None = None  # fraction of expert parameters asked to be removed (None: a fixed rank)
    rank: int | None = None  # the fixed rank asked for (None: allocated from `ratio`)
    error: dict[int, float] = field(default_factory=dict)  # block -> relative Frobenius error of all expert weights
    params: tuple[int, int] = (0, 0)  # routed expert parameters before, after

    def lines(self) -> list[str]:
        asked = f"rank {self.rank}" if self.rank is not None else f"ratio {self.ratio:g} of expert parameters"
        out = [f"{self.method}: shared base + low-rank deltas ({asked}); ranks per block: {self.ranks}",
               f"relative weight error per block: {', '.join(f'{b}: {e:.4f}' for b, e in self.error.items())}",
               f"routed expert parameters: {self.params[0]:,d} -> {self.params[1]:,d}"]
        return out

    def record(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "rank": self.rank,
                "ranks": {str(b): r for b, r in self.ranks.items()}}


def _matrices(experts: Experts) -> dict[str, Tensor]:
    """name -> [E, N, K] weights of the two projections ("gate_up"/"up", "down")."""
    first = "gate_up" if experts.gated else "up"
    return {first: getattr(experts, f"{first}_proj").detach(), "down": experts.down_proj.detach()}


def _check_experts(experts: nn.Module, who: str) -> Experts:
    if type(experts) is not Experts:
        raise ValueError(f"{who}: expects plain fused `Experts` (variant 'ffn'), got {type(experts).__name__}")
    if experts.sharded:
        raise ValueError(f"{who}: the experts hold a shard [{experts.expert_offset}, ...) of the layer; decompose a "
                         "whole layer")
    return experts


def delta_spectra(experts: Experts) -> dict[str, Tensor]:
    """name -> singular values [E, min(N, K)] (float64, descending) of each expert's delta from the mean."""
    out = {}
    for name, w in _matrices(_check_experts(experts, "delta_spectra")).items():
        w = w.double()
        out[name] = torch.linalg.svdvals(w - w.mean(0, keepdim=True))
    return out


def decompose_experts(experts: Experts, rank: int, *, ranks: dict[str, int] | None = None,
                      layer: int | None = None) -> LowRankExperts:
    """`LowRankExperts` with base = the experts' mean and each delta truncated to `rank` by SVD (computed in
    float64, stored in the experts' dtype). `ranks` / `layer`: the per-block rank dict to record in the module's
    config (its entry for `layer` must equal `rank`)."""
    experts = _check_experts(experts, "decompose_experts")
    top = max_rank(experts.dim, experts.hidden, experts.gated)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= top:
        raise ValueError(f"decompose: rank must be an integer in [0, {top}] (D={experts.dim}, F={experts.hidden}), "
                         f"got {rank!r}")
    act_args = experts.act.args() or None
    w0 = experts.down_proj
    with torch.device("meta"):
        new = LowRankExperts(num_experts=experts.num_experts, dim=experts.dim, hidden=experts.hidden,
                             activation=experts.activation, activation_args=act_args, gated=experts.gated,
                             rank=ranks if ranks is not None else rank, layer=layer)
    if new.rank != rank:
        raise ValueError(f"decompose: ranks {ranks} give block {layer} rank {new.rank}, not {rank}")
    for name, w in _matrices(experts).items():
        w = w.double()
        base = w.mean(0)  # [N, K]
        U, S, Vh = torch.linalg.svd(w - base, full_matrices=False)  # [E, N, m], [E, m], [E, m, K]
        r = getattr(new, f"{name}_u").shape[-1]
        u = U[..., :r] * S[:, None, :r]  # [E, N, r]
        v = Vh[:, :r]  # [E, r, K]
        for part, t in (("base", base), ("u", u), ("v", v)):
            setattr(new, f"{name}_{part}", nn.Parameter(t.to(device=w0.device, dtype=w0.dtype).contiguous(),
                                                         requires_grad=w0.requires_grad))
    return new


def lowrank_params(E: int, shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """Parameters of a decomposed layer: per projection N K + E r' (N + K), r' = min(rank, N, K)."""
    return sum(n * k + E * min(rank, n, k) * (n + k) for n, k in shapes.values())


def allocate_ranks(spectra: dict[int, dict[str, Tensor]], shapes: dict[int, dict[str, tuple[int, int]]],
                   num_experts: dict[int, int], budget: int) -> dict[int, int]:
    """block -> rank, greedily (see the module docstring) within `budget` parameters for all the layers'
    decomposed experts. A budget below the bases alone (every rank 0) is a ValueError."""
    ranks = {b: 0 for b in spectra}
    used = sum(lowrank_params(num_experts[b], shapes[b], 0) for b in spectra)
    if used > budget:
        raise ValueError(f"decompose: the shared bases alone need {used:,d} parameters, more than the budget "
                         f"{budget:,d}; use a smaller ratio")
    while True:
        best, best_gain = None, 0.0  # a rank that removes no error is not worth its parameters
        for b, spec in spectra.items():
            r = ranks[b]
            cost = lowrank_params(num_experts[b], shapes[b], r + 1) - lowrank_params(num_experts[b], shapes[b], r)
            if cost == 0 or used + cost > budget:
                continue
            gain = sum(float((s[:, r] ** 2).sum()) for s in spec.values() if s.shape[1] > r) / cost
            if gain > best_gain:
                best, best_gain = b, gain
        if best is None:
            return ranks
        cost = lowrank_params(num_experts[best], shapes[best], ranks[best] + 1) - lowrank_params(
            num_experts[best], shapes[best], ranks[best])
        ranks[best] += 1
        used += cost


def decompose(model: nn.Module, *, rank: int | None = None, ratio: float | None = None) -> DecomposeResult:
    """Replace the routed experts of every MoE layer of `model` (a moekit `MoELM`) by `LowRankExperts`, at a
    fixed `rank` for all layers or with ranks allocated to remove the fraction `ratio` in (0, 1) of the routed
    expert parameters (give exactly one). In place; `model.config` then names the "lowrank" variant with the
    per-block ranks, so `save_checkpoint` / `load_model` round-trip it. Nothing changes when it raises."""
    if (rank is None) == (ratio is None):
        raise ValueError(f"decompose: give exactly one of rank and ratio, got rank={rank!r}, ratio={ratio!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1):
        raise ValueError(f"decompose: ratio must be a fraction of expert parameters to remove in (0, 1), got {ratio!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"decompose: {type(model).__name__} has no MoE layers (a dense model has no experts)")
    for b, layer in layers:
        _check_experts(layer.experts, f"decompose (block {b})")
    ex = {b: layer.experts for b, layer in layers}
    shapes = {b: {name: tuple(w.shape[1:]) for name, w in _matrices(e).items()} for b, e in ex.items()}
    before = sum(sum(p.numel() for p in e.parameters()) for e in ex.values())
    if rank is not None:
        ranks = {b: rank for b in ex}
        for b, e in ex.items():
            top = max_rank(e.dim, e.hidden, e.gated)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= top:
                raise ValueError(f"decompose: rank must be an integer in [0, {top}] (block {b}: D={e.dim}, "
                                 f"F={e.hidden}), got {rank!r}")
    else:
        budget = int((1 - ratio) * before)
        ranks = allocate_ranks({b: delta_spectra(e) for b, e in ex.items()}, shapes,
                               {b: e.num_experts for b, e in ex.items()}, budget)
    per_block = {str(b): r for b, r in ranks.items()}
    new = {b: decompose_experts(e, ranks[b], ranks=per_block, layer=b) for b, e in ex.items()}
    error = {}
    for b, e in ex.items():
        num = sum(float((new[b].materialize().state_dict()[f"{n}_proj"].double() - w.double()).pow(2).sum())
                  for n, w in _matrices(e).items())
        den = sum(float(w.double().pow(2).sum()) for w in _matrices(e).values())
        error[b] = (num / max(den, 1e-30)) ** 0.5
    for b, layer in layers:
        layer.experts = new[b]
    after = sum(sum(p.numel() for p in e.parameters()) for e in new.values())
    if hasattr(model, "config") and dataclasses.is_dataclass(model.config):
        first = next(iter(ex.values()))
        args = {"rank": per_block, "gated": first.gated,
                **({"activation_args": first.act.args()} if first.act.args() else {})}
        model.config = dataclasses.replace(model.config, experts="lowrank", experts_args=args)
    return DecomposeResult("svd", ranks, ratio, rank, error, (before, after))


__all__ = ["DecomposeResult", "allocate_ranks", "decompose", "decompose_experts", "delta_spectra", "lowrank_params"]
