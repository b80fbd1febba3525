"""Every compression method `moekit compress` and `compress_run` can run, by name: the pruning methods of
`prune.METHODS` (frequency, naee, reap), MC-SMoE merging ("mcsmoe") and SVD decomposition ("svd").

A method is a `CompressMethod`: a description, whether it needs a calibration of the model, a `check` run
on the loaded model before any data is read (bad options fail fast and write nothing), and `apply`, which
compresses the model in place and returns a result with `lines()` (the report's heading) and `record()`
(what the new checkpoint's config.json keeps under "compress").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from moekit.compress.calibrate import Calibration, moe_layers
from moekit.compress.prune import get_method, kept_count, list_methods, prune

DEFAULT_RATIO = 0.25


@dataclass(frozen=True)
class CompressOptions:
    """Options of one compression (each method reads the ones it uses)."""

    ratio: float | None = None  # fraction removed: of experts (prune, mcsmoe) or of expert parameters (svd)
    rank: int | None = None  # svd: rank of every layer's deltas (instead of ratio); mcsmoe: rank of the C step
    sparsity: float = 0.0  # mcsmoe C step: fraction of the low-rank residual's entries zeroed, in [0, 1]
    protect_super_experts: bool = True  # keep super experts (pruning: kept; mcsmoe: kept alone)
    budget: str = "uniform"  # pruning: "uniform" (ratio of every layer) | "adaptive" (layer-adaptive, same total)

    def __post_init__(self) -> None:
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float)):
            raise ValueError(f"ratio must be a number in (0, 1), got {self.ratio!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise ValueError(f"rank must be an integer >= 0, got {self.rank!r}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float) or not 0 <= self.sparsity <= 1:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {self.sparsity!r}")
        from moekit.compress.prune import BUDGETS

        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {list(BUDGETS)}, got {self.budget!r}")

    @property
    def expert_ratio(self) -> float:
        return DEFAULT_RATIO if self.ratio is None else self.ratio


@dataclass(frozen=True)
class CompressMethod:
    """One compression method (see the module docstring)."""

    description: str
    calibrated: bool  # needs `calibrate(model, ...)` of the model
    check: Callable[[nn.Module, CompressOptions], None]  # raises ValueError on options the model cannot take
    apply: Callable[[nn.Module, Calibration | None, CompressOptions], Any]  # in place -> result


def _num_experts(model: nn.Module) -> int:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: the model is dense (num_experts=0); there are no experts to "
                         "compress")
    return layers[0][1].experts.num_experts


def _check_ratio(model: nn.Module, opts: CompressOptions) -> None:
    kept_count(_num_experts(model), opts.expert_ratio)


def _pruner(name: str) -> CompressMethod:
    def apply(model: nn.Module, cal: Calibration | None, opts: CompressOptions) -> Any:
        return prune(model, name, cal, ratio=opts.expert_ratio, protect_super_experts=opts.protect_super_experts,
                     budget=opts.budget)

    return CompressMethod(list_methods()[name], True, _check_ratio, apply)


def _uniform_only(name: str, opts: CompressOptions) -> None:
    if opts.budget != "uniform":
        raise ValueError(f"{name}: --budget {opts.budget} is for the pruning methods")


def _check_mcsmoe(model: nn.Module, opts: CompressOptions) -> None:
    from moekit.compress.mcsmoe import check_compress_args

    _uniform_only("mcsmoe", opts)
    _check_ratio(model, opts)
    experts = moe_layers(model)[0][1].experts
    check_compress_args(opts.rank, opts.sparsity, experts.dim, experts.hidden)


def _mcsmoe(model: nn.Module, cal: Calibration | None, opts: CompressOptions) -> Any:
    from moekit.compress.mcsmoe import mcsmoe

    return mcsmoe(model, cal, ratio=opts.expert_ratio, rank=opts.rank, sparsity=opts.sparsity,
                  protect_super_experts=opts.protect_super_experts)


def _svd_args(opts: CompressOptions) -> dict[str, Any]:
    return {"rank": opts.rank} if opts.rank is not None else {"ratio": opts.expert_ratio}


def _check_svd(model: nn.Module, opts: CompressOptions) -> None:
    from moekit.compress.decompose import _check_experts
    from moekit.layers.lowrank import max_rank

    _num_experts(model)
    _uniform_only("svd", opts)
    if opts.rank is not None and opts.ratio is not None:
        raise ValueError("svd: give --rank or --ratio, not both")
    if opts.ratio is not None and not 0 < opts.ratio < 1:
        raise ValueError(f"ratio must be a fraction of expert parameters to remove in (0, 1), got {opts.ratio!r}")
    for b, layer in moe_layers(model):
        e = _check_experts(layer.experts, f"svd (block {b})")
        top = max_rank(e.dim, e.hidden, e.gated)
        if opts.rank is not None and opts.rank > top:
            raise ValueError(f"rank must be an integer in [0, {top}] (D={e.dim}, F={e.hidden}), got {opts.rank}")


def _svd(model: nn.Module, cal: Calibration | None, opts: CompressOptions) -> Any:
    from moekit.compress.decompose import decompose

    return decompose(model, **_svd_args(opts))


OTHERS: dict[str, CompressMethod] = {
    "mcsmoe": CompressMethod("merge experts by router-logit similarity around the most used (MC-SMoE)", True,
                             _check_mcsmoe, _mcsmoe),
    "svd": CompressMethod("shared base + low-rank per-expert deltas by SVD (D^2-MoE style, no calibration)", False,
                          _check_svd, _svd),
}


# methods that train (moekit's trainer), with their own library calls: `moekit.compress.distill.distill_run`,
# `moekit.compress.qat.qat_run`; `moekit compress --list` prints them with the others
TRAINED: dict[str, str] = {
    "distill": "train a student run on KL(teacher || student) + LM loss (KD; Every Expert Matters augmentation)",
    "qat": "quantization-aware fine-tuning of routed experts to binary (BinaryConnect) or ternary (MoTE) weights",
}


def list_compressors() -> dict[str, str]:
    """name -> one-line description of every compression method, sorted by name."""
    return dict(sorted({**list_methods(), **{n: m.description for n, m in OTHERS.items()}}.items()))


def get_compressor(name: str) -> CompressMethod:
    """The method `name`; an unknown name is a ValueError listing the known ones."""
    if name in OTHERS:
        return OTHERS[name]
    if name in list_methods():
        get_method(name)
        return _pruner(name)
    raise ValueError(f"unknown compression method {name!r}; known: {sorted(list_compressors())}")


__all__ = ["CompressMethod", "CompressOptions", "get_compressor", "list_compressors"]
