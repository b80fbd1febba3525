"""MC-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy").

Per MoE layer, merging E experts into G (the same G in every layer, G = E - round(ratio x E)):
1. Dominant experts: the G most frequently routed (calibration counts; ties: lower id). Super experts (the
   `prune.super_experts` rule) are made dominant first and stay alone (no expert is merged into them) unless
   protection is turned off.
2. Grouping: every other expert joins the dominant expert whose router logits are most similar to its own:
   the cosine similarity of the two experts' router-logit columns over the calibration tokens
   (`LayerStats.logit_similarity()`; ties: the more frequent dominant expert, then the lower id).
3. Alignment: before averaging, each member's FFN neurons are permuted to match the group's dominant expert
   (weight matching: the permutation maximising sum_i <c_i, m_pi(i)>, where neuron i's vector is its gate row,
   up row and down column concatenated; solved as a linear assignment with scipy). A permutation of an
   expert's hidden neurons leaves the expert's function unchanged.
4. Merging: the frequency-weighted average of the aligned members (weights: calibration counts; equal when the
   whole group was never routed), with `moekit.layers.surgery.merge_experts`, which averages the router's gate
   rows (and biases) with the same weights, so the layer routes to the merged expert wherever it routed to a
   member whose row dominates the average.
5. Optional "C" step (`rank`, `sparsity`): every expert of the merged layer has each projection W replaced by
   L + S, L its rank-`rank` truncated SVD and S the residual W - L with its smallest-magnitude fraction
   `sparsity` of entries zeroed. This is the one-shot form of the paper's low-rank + sparse compression (the
   paper refines it with fine-tuning); the weights stay stored dense, and `MergeResult.compressed_params`
   counts what the factors and the sparse values would take (indices not counted).
Differences from the paper: one G for every layer (moekit's config holds one expert count; the paper can
allocate dominant experts across layers), and no fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import Calibration, LayerStats, calibrated_layers
from moekit.compress.prune import check_router_k, kept_count, super_experts
from moekit.layers.experts import Experts
from moekit.layers.surgery import merge_experts, replace_expert
from moekit.utils.deps import require


def expert_weights(experts: Experts, e: int) -> dict[str, Tensor]:
    """Expert e's per-expert tensors: {"gate_up_proj" [2F, D] or "up_proj" [F, D], "down_proj" [D, F]}."""
    first = "gate_up_proj" if experts.gated else "up_proj"
    return {first: getattr(experts, first).detach()[e], "down_proj": experts.down_proj.detach()[e]}


def neuron_vectors(weights: dict[str, Tensor]) -> Tensor:
    """[F, 3D] (gated: gate row, up row, down column) or [F, 2D]: one vector per hidden neuron."""
    down = weights["down_proj"]  # [D, F]
    if "gate_up_proj" in weights:
        gate, up = weights["gate_up_proj"].chunk(2, dim=0)  # [F, D] each
        return torch.cat([gate, up, down.t()], dim=1)
    return torch.cat([weights["up_proj"], down.t()], dim=1)


def align_permutation(center: dict[str, Tensor], member: dict[str, Tensor]) -> Tensor:
    """LongTensor [F]: perm with member neuron perm[i] matched to centre neuron i, maximising the summed inner
    products of matched neuron vectors (weight matching by linear assignment)."""
    lsa = require("scipy").optimize.linear_sum_assignment
    score = neuron_vectors(center).double() @ neuron_vectors(member).double().t()  # [F, F]
    rows, cols = lsa(score.cpu().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_expert(weights: dict[str, Tensor], perm: Tensor) -> dict[str, Tensor]:
    """The expert with hidden neuron i taken from neuron perm[i] (the same function)."""
    out = {"down_proj": weights["down_proj"][:, perm]}
    if "gate_up_proj" in weights:
        gate, up = weights["gate_up_proj"].chunk(2, dim=0)
        out["gate_up_proj"] = torch.cat([gate[perm], up[perm]])
    else:
        out["up_proj"] = weights["up_proj"][perm]
    return out


def group_experts(similarity: Tensor, counts: Tensor, num_groups: int, protected: list[int] = ()
                  ) -> list[list[int]]:
    """MC-SMoE grouping: `num_groups` dominant experts (the `protected` ones, then the most frequent by
    `counts [E]`), each other expert added to its most similar unprotected dominant expert (`similarity
    [E, E]`). Returns the groups, each its dominant expert first, then its members in id order; groups in
    the order of their dominant experts' ids."""
    E = len(counts)
    if not 1 <= num_groups <= E:
        raise ValueError(f"group_experts: num_groups must be in [1, {E}], got {num_groups}")
    if len(protected) > num_groups:
        raise ValueError(f"group_experts: {len(protected)} protected experts {list(protected)} exceed the "
                         f"{num_groups} groups")
    by_freq = sorted(range(E), key=lambda e: (-int(counts[e]), e))
    dominant = list(protected) + [e for e in by_freq if e not in protected][: num_groups - len(protected)]
    open_ = [d for d in dominant if d not in protected]
    members: dict[int, list[int]] = {d: [] for d in dominant}
    rest = [e for e in range(E) if e not in dominant]
    if rest and not open_:
        raise ValueError(f"group_experts: every dominant expert is protected {list(protected)}; experts {rest} have "
                         "no group (use a smaller ratio or turn protection off)")
    for e in rest:
        best = max(open_, key=lambda d: (float(similarity[e, d]), int(counts[d]), -d))
        members[best].append(e)
    return [[d, *sorted(members[d])] for d in sorted(dominant)]


def low_rank_sparse(w: Tensor, rank: int, sparsity: float) -> tuple[Tensor, int]:
    """(L + S, stored numbers): L the rank-`rank` truncated SVD of w [N, K], S = w - L with the fraction
    `sparsity` of its entries of smallest magnitude zeroed. Stored: rank (N + K) + nonzeros of S."""
    N, K = w.shape
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    low = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    res = w.double() - low
    keep = N * K - round(sparsity * N * K)  # residual entries kept
    idx = res.abs().flatten().topk(keep).indices
    sparse = torch.zeros(N * K, dtype=res.dtype).index_copy(0, idx, res.flatten()[idx]).view(N, K)
    return (low + sparse).to(w.dtype), rank * (N + K) + int((sparse != 0).sum())


@dataclass
class MergeResult:
    """What `mcsmoe` did."""

    method: str
    ratio: float
    groups: dict[int, list[list[int]]]  # block -> new expert j's old ids, groups[j] (dominant first)
    protected: dict[int, list[int]] = field(default_factory=dict)  # block -> super experts kept alone
    never_routed: dict[int, list[int]] = field(default_factory=dict)
    rank: int | None = None  # rank of the "C" step (None: no compression after merging)
    sparsity: float = 0.0  # fraction of residual entries zeroed in the "C" step
    compressed_params: int | None = None  # numbers the C step's factors + sparse values take (all MoE layers)

    def lines(self) -> list[str]:
        out = [f"{self.method}: merged {self.ratio:g} of the experts per MoE layer into groups "
               f"(per block: {', '.join(f'{b}: {g}' for b, g in self.groups.items())})"]
        if self.protected:
            out.append(f"protected super experts (kept alone): {self.protected}")
        if self.never_routed:
            out.append(f"never routed in calibration: {self.never_routed}")
        if self.rank is not None:
            out.append(f"compress step: rank {self.rank} + sparse residual (sparsity {self.sparsity:g}): "
                       f"{self.compressed_params:,d} stored numbers if factored (weights kept dense)")
        return out

    def record(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "groups": {str(b): g for b, g in self.groups.items()},
                "protected": {str(b): p for b, p in self.protected.items()}, "rank": self.rank,
                "sparsity": self.sparsity}


def check_compress_args(rank: int | None, sparsity: float, dim: int, hidden: int) -> None:
    """ValueError unless rank is None or in [0, min(D, F)] and sparsity in [0, 1]."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(dim, hidden)):
        raise ValueError(f"mcsmoe: rank must be an integer in [0, {min(dim, hidden)}] (min of D={dim}, F={hidden}), "
                         f"got {rank!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity <= 1:
        raise ValueError(f"mcsmoe: sparsity must be a fraction in [0, 1], got {sparsity!r}")


def merge_layer(layer: nn.Module, stats: LayerStats, num_groups: int, *, protected: list[int] = (),
                align: bool = True, rank: int | None = None, sparsity: float = 0.0) -> tuple[list[list[int]], int]:
    """MC-SMoE on one MoE layer with `Experts` (steps 2-5 of the module docstring); in place.
    Returns (groups, numbers stored by the C step (0 without it))."""
    experts = layer.experts
    if type(experts) is not Experts:
        raise ValueError(f"mcsmoe: expects plain fused `Experts`, got {type(experts).__name__}")
    groups = group_experts(stats.logit_similarity(), stats.counts, num_groups, protected)
    if align:
        for g in groups:
            center = expert_weights(experts, g[0])
            for m in g[1:]:
                w = expert_weights(experts, m)
                replace_expert(layer, m, {k: v.clone() for k, v in permute_expert(w, align_permutation(center, w))
                                          .items()})
    weights = []
    for g in groups:
        c = [float(stats.counts[e]) for e in g]
        weights.append(c if sum(c) > 0 else [1.0] * len(g))
    groups = merge_experts(layer, groups, weights)  # new expert j is made of groups[j] (dominant first)
    stored = 0
    if rank is not None:
        experts = layer.experts
        for e in range(experts.num_experts):
            new = {}
            for name, w in expert_weights(experts, e).items():
                new[name], n = low_rank_sparse(w, rank, sparsity)
                stored += n
            replace_expert(layer, e, new)
    return groups, stored


def mcsmoe(model: nn.Module, calibration: Calibration, *, ratio: float, rank: int | None = None,
           sparsity: float = 0.0, align: bool = True, protect_super_experts: bool = True) -> MergeResult:
    """Merge the fraction `ratio` of the experts of every MoE layer of `model` (a moekit `MoELM`) away by
    MC-SMoE on `calibration` (of this model, with the "logits" record), then optionally compress every merged
    expert to rank `rank` + a sparse residual at `sparsity`. In place; `model.config.num_experts` is updated.
    Nothing changes when it raises (a bad ratio, rank or sparsity, a router `k` above the merged count)."""
    layers = calibrated_layers(model, calibration, "mcsmoe", "merge")
    counts = {layer.experts.num_experts for _, layer in layers}
    if len(counts) != 1:
        raise ValueError(f"mcsmoe: every MoE layer must have the same number of experts, got {sorted(counts)}")
    E = counts.pop()
    G = kept_count(E, ratio)
    for b, layer in layers:
        if type(layer.experts) is not Experts:
            raise ValueError(f"mcsmoe: block {b} has {type(layer.experts).__name__} experts; MC-SMoE merges "
                             "plain fused `Experts`")
        check_compress_args(rank, sparsity, layer.experts.dim, layer.experts.hidden)
        stats = calibration.layer(b)
        if stats.num_experts != E:
            raise ValueError(f"mcsmoe: calibration of block {b} has {stats.num_experts} experts, the layer {E}")
        if stats.logits_gram is None:
            raise ValueError("mcsmoe: the calibration has no router-logit similarity; calibrate with record "
                             "including 'logits'")
    check_router_k(layers, G, ratio, "mcsmoe")
    protected = super_experts(calibration) if protect_super_experts else {}
    args = dict(align=align, rank=rank, sparsity=sparsity)
    for b, layer in layers:  # a dry run on copies: a router that refuses the merged set raises here
        merge_layer(copy.deepcopy(layer), calibration.layer(b), G, protected=sorted(protected.get(b, [])), **args)
    groups, stored = {}, 0
    for b, layer in layers:
        groups[b], n = merge_layer(layer, calibration.layer(b), G, protected=sorted(protected.get(b, [])), **args)
        stored += n
    if hasattr(model, "config") and dataclasses.is_dataclass(model.config):
        model.config = dataclasses.replace(model.config, num_experts=G)
    return MergeResult("mcsmoe", ratio, groups, protected, calibration.never_routed, rank, sparsity,
                       stored if rank is not None else None)


__all__ = ["MergeResult", "align_permutation", "group_experts", "low_rank_sparse", "mcsmoe", "merge_layer",
           "permute_expert"]
