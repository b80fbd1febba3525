"""Expert pruning of moekit LMs and patched Hugging Face models: the methods' registry, super-expert
protection, and applying the kept experts with `keep_experts` (DESIGN.md, contract 6).

A method scores or searches each MoE layer on a `Calibration` and returns the expert ids to keep; `prune`
then keeps the same number of experts in every MoE layer (by default; Hugging Face configs hold one expert
count) and updates a moekit LM's `model.config.num_experts` (or `num_experts_per_layer`), so
`save_checkpoint` / `load_model` round-trip the pruned model; a patched Hugging Face model saves with
`moekit.hf.save` (`moekit.compress.hf`).

Layer-adaptive budgets (`budget="adaptive"`), after Xu et al. 2023, "Efficient Joint Optimization of
Layer-Adaptive Weight Pruning in Deep Neural Networks": the same total number of experts is removed, spread over
the layers to minimise the sum of the layers' output distortions, each layer's distortion for n experts removed
being the NAEE reconstruction error mean ||MoE_S(x) - MoE(x)||^2 on the calibration inputs of the subset S the
method keeps at E - n; the sum is minimised exactly by dynamic programming over (layer, experts removed so far),
as the paper does for its additive distortion model. A moekit LM then holds `LMConfig.num_experts_per_layer`.

Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models") are
protected by default: the rule of `moekit.analyze.metrics.experts.super_experts` (an expert's peak |output|
at or above the `quantile` of all routed experts' peaks AND at least `ratio` x their median), computed here
on the calibration's activation maxima (`LayerStats.peak`) instead of a trace.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import Calibration, LayerStats, calibrated_layers
from moekit.layers.moe import MoE
from moekit.layers.surgery import keep_experts
from moekit.models.config import LMConfig
from moekit.routing.registry import build_router, router_config

# name -> select(layer, stats, keep, protected) -> kept expert ids (any order; `prune` sorts them)
Selector = Callable[[MoE, LayerStats, int, list[int]], list[int]]
METHODS: dict[str, Selector] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_method(name: str, description: str) -> Callable[[Selector], Selector]:
    """Register a pruning method under `name` (one way in: `METHODS`)."""

    def deco(fn: Selector) -> Selector:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        METHODS[name] = fn
        DESCRIPTIONS[name] = description
        return fn

    return deco


def get_method(name: str) -> Selector:
    _load_methods()
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def list_methods() -> dict[str, str]:
    """name -> one-line description of every pruning method."""
    _load_methods()
    return dict(sorted(DESCRIPTIONS.items()))


def _load_methods() -> None:
    from moekit.compress import frequency, naee, reap  # noqa: F401  (registration)


def kept_count(num_experts: int, ratio: float) -> int:
    """Experts kept per layer when removing the fraction `ratio` in (0, 1) of `num_experts`
    (removed = round(ratio x E), at least one removed and one kept)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be a fraction of experts to remove in (0, 1), got {ratio!r}")
    removed = math.floor(ratio * num_experts + 0.5)
    if removed < 1 or removed >= num_experts:
        raise ValueError(f"ratio {ratio} of {num_experts} experts removes {removed}; it must remove at least one "
                         f"and keep at least one")
    return num_experts - removed


def check_router_k(layers: list[tuple[int, MoE]], keep: int, ratio: float, who: str) -> None:
    """ValueError when a layer's router chooses more experts per token than the `keep` left."""
    for b, layer in layers:
        k = max((getattr(r, "nominal_k", None) or getattr(r, "k", 0) or 0) for r in layer.routers)
        if k > keep:
            raise ValueError(f"{who}: the router of block {b} chooses k={k} experts per token, more than the "
                             f"{keep} kept of {layer.experts.num_experts} (ratio {ratio}); use a smaller ratio")


def top_scored(scores: Tensor, keep: int, protected: list[int]) -> list[int]:
    """The `protected` experts, then the highest `scores` [E] (ties: lower id first), `keep` in all."""
    rest = [e for e in sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e)) if e not in protected]
    return list(protected) + rest[: keep - len(protected)]


def super_experts(calibration: Calibration, quantile: float = 0.995, ratio: float = 10.0) -> dict[int, list[int]]:
    """block -> super experts by the analyze rule on the calibration's peaks (routed experts only)."""
    peaks = [(s.block, e, float(s.peak[e])) for s in calibration.layers for e in range(s.num_experts)
             if int(s.counts[e]) > 0]
    if not peaks:
        return {}
    values = torch.tensor([p for _, _, p in peaks], dtype=torch.float64)
    cut = float(torch.quantile(values, quantile))
    median = float(torch.quantile(values, 0.5))  # numpy's median (the analyze rule's)
    out: dict[int, list[int]] = {}
    for block, e, p in peaks:
        if p >= cut and p >= ratio * median and p > 0:
            out.setdefault(block, []).append(e)
    return out


BUDGETS = ("uniform", "adaptive")  # how the experts removed are spread over the layers


def allocate(costs: dict[int, list[float]], total: int) -> dict[int, int]:
    """block -> experts removed, minimising sum_b costs[b][n_b] subject to sum_b n_b = total, by dynamic
    programming; costs[b][n] is block b's cost with n removed (n = 0 .. len(costs[b]) - 1). Ties: the first
    minimum in block order with fewer removals earlier. ValueError when `total` exceeds what the blocks allow."""
    blocks = list(costs)
    if total > sum(len(c) - 1 for c in costs.values()):
        raise ValueError(f"allocate: {total} experts to remove, but the layers allow at most "
                         f"{sum(len(c) - 1 for c in costs.values())}")
    best = [0.0] + [math.inf] * total  # best[t]: least cost of the blocks so far removing t
    choice: list[list[int]] = []
    for b in blocks:
        new, pick = [math.inf] * (total + 1), [0] * (total + 1)
        for t in range(total + 1):
            for n in range(min(t, len(costs[b]) - 1) + 1):
                c = best[t - n] + costs[b][n]
                if c < new[t]:
                    new[t], pick[t] = c, n
        best = new
        choice.append(pick)
    out, t = {}, total
    for b, pick in zip(reversed(blocks), reversed(choice), strict=True):
        out[b] = pick[t]
        t -= pick[t]
    return dict(sorted(out.items()))


@dataclass
class PruneResult:
    """What `prune` did."""

    method: str
    ratio: float
    kept: dict[int, list[int]]  # block -> old ids of the kept experts (new expert j is kept[j])
    protected: dict[int, list[int]] = field(default_factory=dict)  # block -> super experts kept by protection
    never_routed: dict[int, list[int]] = field(default_factory=dict)  # block -> experts calibration never routed
    router_args: dict[int, dict[str, Any]] = field(default_factory=dict)  # block -> router arguments changed with
    # the expert set (e.g. DeepSeek's new n_group / topk_group); blocks without changes are left out
    budget: str = "uniform"  # "uniform" (the same count removed per layer) or "adaptive" (layer-adaptive)
    costs: dict[int, list[float]] = field(default_factory=dict)  # adaptive: block -> distortion for n removed

    def lines(self) -> list[str]:
        """The report's heading: what was removed, kept, protected."""
        how = "per MoE layer" if self.budget == "uniform" else "in all, layer-adaptive budget"
        out = [f"{self.method}: removed {self.ratio:g} of the experts {how} "
               f"(kept per block: {', '.join(f'{b}: {ids}' for b, ids in self.kept.items())})"]
        if self.router_args:
            out.append(f"router arguments changed with the kept experts: {self.router_args}")
        if self.protected:
            out.append(f"protected super experts: {self.protected}")
        if self.never_routed:
            out.append(f"never routed in calibration: {self.never_routed}")
        return out

    def record(self) -> dict:
        """What the compressed checkpoint's config.json keeps."""
        return {"method": self.method, "ratio": self.ratio, "kept": {str(b): ids for b, ids in self.kept.items()},
                "protected": {str(b): ids for b, ids in self.protected.items()}, "budget": self.budget}


def prune(
    model: nn.Module,
    method: str,
    calibration: Calibration,
    *,
    ratio: float,
    protect_super_experts: bool = True,
    router_args: dict[str, Any] | None = None,
    budget: str = "uniform",
) -> PruneResult:
    """Remove the fraction `ratio` of experts in every MoE layer of `model` (a moekit `MoELM` or a patched
    Hugging Face model), chosen by `method` (see `list_methods()`) on `calibration` (of this model); in place.

    router_args: router arguments to set with the kept experts in every layer; None asks each router
    (its `regroup(sources, force=...)`, e.g. DeepSeek's groups, so they stay valid), giving every layer
    the same arguments (a Hugging Face config holds one value for all layers).
    budget: "uniform" removes round(ratio x E) experts from every layer; "adaptive" removes the same total,
    spread over the layers by `allocate` on each layer's reconstruction error (see the module docstring; needs
    calibration inputs). A moekit LM with unequal counts gets `config.num_experts_per_layer`; a Hugging Face
    config holds one expert count, so `moekit.hf.save` refuses such a model.
    A moekit LM's `config.num_experts` is updated; a Hugging Face model's config is updated when saved
    (`moekit.hf.save`). Nothing changes when it raises (a bad ratio, a router `k` larger than the kept
    count, too many super experts to keep, router arguments the router refuses)."""
    select = get_method(method)
    layers = calibrated_layers(model, calibration, "prune", "prune")
    if budget not in BUDGETS:
        raise ValueError(f"prune: budget must be one of {list(BUDGETS)}, got {budget!r}")
    sizes = {b: layer.experts.num_experts for b, layer in layers}
    if budget == "uniform" and len(set(sizes.values())) != 1:
        raise ValueError(f"prune: every MoE layer must have the same number of experts, got "
                         f"{sorted(set(sizes.values()))} (budget='adaptive' takes unequal layers)")
    keeps = {b: kept_count(E, ratio) for b, E in sizes.items()}
    for b, _ in layers:
        if calibration.layer(b).num_experts != sizes[b]:
            raise ValueError(f"prune: calibration of block {b} has {calibration.layer(b).num_experts} experts, "
                             f"the layer {sizes[b]} (calibrate the model you prune)")
    protected = super_experts(calibration) if protect_super_experts else {}
    if budget == "uniform":
        keep = keeps[layers[0][0]]
        check_router_k(layers, keep, ratio, "prune")
        for b, ids in protected.items():
            if len(ids) > keep:
                raise ValueError(f"prune: block {b} has {len(ids)} super experts {ids}, more than the {keep} kept; "
                                 "use a smaller ratio or protect_super_experts=False")
        costs: dict[int, list[float]] = {}
    else:
        costs = _distortions(layers, calibration, select, protected)
        keeps = {b: sizes[b] - n for b, n in allocate(costs, sum(sizes[b] - k for b, k in keeps.items())).items()}
    kept = {}
    for b, layer in layers:
        ids = sorted(select(layer, calibration.layer(b), keeps[b], sorted(protected.get(b, []))))
        if len(ids) != keeps[b] or len(set(ids)) != keeps[b]:
            raise RuntimeError(f"prune: method {method!r} chose {ids} in block {b}, expected {keeps[b]} distinct ids")
        kept[b] = ids
    args = _kept_router_args(layers, kept, router_args)
    for b, layer in layers:
        keep_experts(layer, kept[b], router_args=args[b] or None)
    if isinstance(getattr(model, "config", None), LMConfig):
        model.config = with_expert_counts(model.config, {b: len(ids) for b, ids in kept.items()})
    return PruneResult(method, ratio, kept, protected, calibration.never_routed,
                       {b: a for b, a in args.items() if a}, budget, costs)


def with_expert_counts(cfg: LMConfig, counts: dict[int, int]) -> LMConfig:
    """`cfg` with block -> routed expert count: one `num_experts` when all are equal, else the largest plus
    `num_experts_per_layer` (0 for dense blocks)."""
    if len(set(counts.values())) == 1:
        return dataclasses.replace(cfg, num_experts=next(iter(counts.values())), num_experts_per_layer=None)
    per_layer = [counts.get(i, 0) if cfg.is_moe_layer(i) else 0 for i in range(cfg.n_layers)]
    return dataclasses.replace(cfg, num_experts=max(per_layer), num_experts_per_layer=per_layer)


def _distortions(layers: list[tuple[int, MoE]], calibration: Calibration, select: Selector,
                 protected: dict[int, list[int]]) -> dict[int, list[float]]:
    """block -> [NAEE reconstruction error of the subset `select` keeps with n removed, n = 0 .. the most the
    layer allows (keeping its router's k, its super experts and one expert)]."""
    from moekit.compress.naee import reconstruction_error

    out = {}
    for b, layer in layers:
        stats = calibration.layer(b)
        if stats.inputs is None or not len(stats.inputs):
            raise ValueError(f"prune: budget='adaptive' needs the calibration inputs of block {b} (calibrate with "
                             "record including 'inputs')")
        p = next(layer.parameters())
        x = stats.inputs.to(device=p.device, dtype=p.dtype)
        E = layer.experts.num_experts
        k = max((getattr(r, "nominal_k", None) or getattr(r, "k", 0) or 0) for r in layer.routers)
        floor = max(k, len(protected.get(b, [])), 1)
        with torch.no_grad():
            reference = layer(x)[0]
            out[b] = [0.0] + [
                reconstruction_error(layer, x, sorted(select(layer, stats, E - n, sorted(protected.get(b, [])))),
                                     reference)
                for n in range(1, E - floor + 1)
            ]
    return out


def _kept_router_args(layers: list[tuple[int, MoE]], kept: dict[int, list[int]],
                      router_args: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """block -> router arguments for its kept experts (given, or asked of the routers' `regroup`: one
    value for all layers), each checked by building the router from them (before any layer changes)."""
    if router_args is not None:
        args = {b: dict(router_args) for b, _ in layers}
    else:
        def ask(force: bool) -> dict[int, dict[str, Any]]:
            out = {}
            for b, layer in layers:
                regroup = getattr(layer.router, "regroup", None)
                out[b] = regroup([[i] for i in kept[b]], force=force) if regroup is not None else {}
            return out

        args = ask(False)
        if any(args.values()) and len({json.dumps(a, sort_keys=True) for a in args.values()}) > 1:
            args = ask(True)
    for b, layer in layers:
        for router in layer.routers:
            try:
                config = router_config(router)
            except TypeError:  # not a registered router: keep_experts checks what it can
                continue
            try:
                with torch.random.fork_rng(devices=[]):
                    build_router(config["name"], **{**config["args"], **args[b], "num_experts": len(kept[b])})
            except (ValueError, TypeError) as err:
                raise ValueError(f"prune: the router of block {b} cannot route over the {len(kept[b])} kept "
                                 f"experts: {err}") from None
    return args
