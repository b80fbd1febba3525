"""Expert-set surgery: keep, merge, replace and add experts of an MoE layer (DESIGN.md, contract 6).

Each operation changes the experts' fused weights and every per-expert tensor of the layer's router
(gate weight rows, biases, DeepSeek's selection bias, prototypes, a recurrent router's output rows,
...) together, and updates `num_experts` on both; compression, conversion and expert placement use
only these functions, never private tensors. They work on any module with `experts` and `router`
(or `routers`, one per iteration) attributes: moekit's `MoE` and a patched Hugging Face block
(`moekit.hf.PatchedMoE`, whose transformers attribute names then hold the new tensors, so
`moekit.hf.save` writes them).

Routers and experts declare which tensors index experts, as a class attribute read here:

    expert_dims = {"weight": 0}                     # name (dotted for submodules) -> the expert dim
    expert_dims = {"query_key_value.weight": (0, 3)}  # (dim, blocks): 3 stacked blocks of E rows
    expert_dims = {}                                # no per-expert tensors (random routing)
    expert_dims = None                              # cannot change its expert set (hash routing)

Along that dim a tensor holds `blocks * E` per-expert rows, then any extra rows, which stay as they
are (the null experts of `null_experts`: E real + N null gate rows, only the real rows change). A
router may also define `expert_args(sources, requested) -> dict` to change its own arguments for
the new expert set (DeepSeek's groups, ProMoE's unconditional experts) or raise when it cannot.
The new router arguments are checked by building the router from its config, so a `k` larger than
the new number of experts is the router's own error; nothing changes when an operation raises.

Every operation but `replace_expert` creates new parameter objects (the shapes change): build the
optimizer after surgery.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.routing.registry import build_router, router_config

INITS = ("random", "zeros", "copy:<i>")


@dataclass(frozen=True)
class _Row:
    """How one new expert is made: a weighted average of old experts (`sources`, `weights` summing
    to 1), or a fresh expert (`sources` empty, `init` "random" or "zeros")."""

    sources: tuple[int, ...]
    weights: tuple[float, ...] = ()
    init: str = ""


def keep_experts(layer: nn.Module, ids: Sequence[int] | Tensor, *, router_args: dict[str, Any] | None = None
                 ) -> list[list[int]]:
    """Keep the experts `ids` (in that order: new expert j is old expert ids[j]) and remove the others.

    Args:
        layer: an `MoE` (or a patched Hugging Face block).
        ids: distinct expert ids in [0, E), at least one.
        router_args: router arguments to set with the new expert set (e.g. DeepSeek's
            `{"n_group": 2, "topk_group": 1}` when the kept experts no longer fill its groups).
    Returns the sources of each new expert ([[ids[0]], [ids[1]], ...]).

    With routers that choose by score (top-k and its variants), the pruned layer routes as the old
    one with the removed experts' logits at -inf (docs/surgery.md lists the exceptions).
    """
    who = "keep_experts"
    E = _num_experts(layer, who)
    ids = _id_list(ids, E, who, "ids")
    if not ids:
        raise ValueError(f"{who}: ids must name at least one expert to keep, got none")
    dup = _duplicates(ids)
    if dup:
        raise ValueError(f"{who}: ids must be distinct, got {dup} more than once")
    return _apply(layer, [_Row((i,), (1.0,)) for i in ids], who, router_args)


def merge_experts(
    layer: nn.Module,
    groups: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]] | None = None,
    *,
    router_args: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Merge each group of experts into one expert: the weighted average of the group's weights.

    The merged expert's every per-expert tensor (fused expert weights, router gate rows, biases,
    selection bias, prototypes, ...) is the same weighted average of the group's rows, so for a
    linear gate its logit is the weighted average of the group's logits. Experts in no group stay
    as they are. The new experts are ordered by their smallest old id (a group takes the place of
    its first member).

    Args:
        layer: an `MoE` (or a patched Hugging Face block).
        groups: disjoint non-empty lists of expert ids in [0, E).
        weights: per group, one weight >= 0 per member (normalised to sum 1; e.g. how often each
            expert is chosen); None: equal weights.
        router_args: router arguments to set with the new expert set.
    Returns the sources of each new expert (a group's members, or [e] for an expert left alone).
    """
    who = "merge_experts"
    E = _num_experts(layer, who)
    if isinstance(groups, Tensor) or not isinstance(groups, Sequence) or not groups:
        raise ValueError(f"{who}: groups must be a non-empty list of lists of expert ids, got {groups!r}")
    groups = [_id_list(g, E, who, f"groups[{n}]") for n, g in enumerate(groups)]
    if any(not g for g in groups):
        raise ValueError(f"{who}: every group must hold at least one expert id, got {groups}")
    dup = _duplicates([e for g in groups for e in g])
    if dup:
        raise ValueError(f"{who}: an expert may be in one group once, got {dup} more than once")
    if weights is None:
        weights = [[1.0] * len(g) for g in groups]
    if len(weights) != len(groups) or any(len(w) != len(g) for w, g in zip(weights, groups, strict=False)):
        raise ValueError(f"{who}: weights must have one list per group and one weight per member, "
                         f"like groups {groups}; got {weights!r}")
    by_first: dict[int, _Row] = {}
    for g, w in zip(groups, weights, strict=True):
        w = [float(v) for v in w]
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"{who}: weights of group {g} must be finite, >= 0 and not all 0, got {w}")
        total = sum(w)
        by_first[min(g)] = _Row(tuple(g), tuple(v / total for v in w))
    grouped = {e for g in groups for e in g}
    rows = [by_first[e] if e in by_first else _Row((e,), (1.0,)) for e in range(E) if e in by_first or e not in grouped]
    return _apply(layer, rows, who, router_args)


def add_experts(
    layer: nn.Module,
    n: int,
    init: str = "random",
    *,
    seed: int | None = None,
    router_args: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Append `n` experts (ids E .. E + n - 1), each made as `init` says, router rows included.

    Args:
        layer: an `MoE` (or a patched Hugging Face block).
        n: experts to add (>= 1).
        init: "copy:<i>" (copies of expert i: its expert weights and its router rows, so each copy
            scores as expert i does), "random" (every per-expert tensor's new rows drawn from
            N(0, s^2), s the standard deviation of that tensor's existing rows: the scale the
            experts and the router were built or trained at) or "zeros" (all new rows zero: an
            expert whose output is 0).
        seed: seed of the "random" draw (None: torch's global generator).
        router_args: router arguments to set with the new expert set (e.g. DeepSeek's `n_group`).
    Returns the sources of each new expert ([[0], ..., [E - 1], then [i] per copy or [] per fresh one]).
    """
    who = "add_experts"
    E = _num_experts(layer, who)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{who}: n must be a positive integer, got {n!r}")
    if init.startswith("copy:"):
        src = _id_list([_parse_int(init[5:], who, init)], E, who, "init")
        new = _Row((src[0],), (1.0,))
    elif init in ("random", "zeros"):
        new = _Row((), (), init)
    else:
        raise ValueError(f"{who}: init must be one of {list(INITS)}, got {init!r}")
    rows = [_Row((e,), (1.0,)) for e in range(E)] + [new] * n
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return _apply(layer, rows, who, router_args, gen)


def replace_expert(layer: nn.Module, i: int, module_or_weights: nn.Module | dict[str, Tensor]) -> None:
    """Overwrite expert `i`'s weights in place (the router is unchanged: it still routes to slot i).

    Args:
        layer: an `MoE` (or a patched Hugging Face block).
        i: expert id in [0, E).
        module_or_weights: the new expert, as
            - a dict {tensor name: expert i's slice}, for every per-expert tensor of the experts
              (for `Experts`: `gate_up_proj [2F, D]` (gate rows, then up rows) and `down_proj [D, F]`;
              non-gated: `up_proj [F, D]` and `down_proj [D, F]`);
            - a dense `MLP` (or any module with `gate_proj`, `up_proj`, `down_proj` linears, the
              Hugging Face layout) of the experts' width and activation;
            - an experts module of the same class holding one expert.
    The tensors keep their identity (a patched Hugging Face block and its original share them).
    """
    who = "replace_expert"
    E = _num_experts(layer, who)
    (i,) = _id_list([i], E, who, "i")
    experts = layer.experts
    specs = _specs(experts, f"experts {type(experts).__name__}", who)
    slots = {name: _slot(t, dim, blocks, E, i) for name, (t, dim, blocks) in specs.items()}
    new = _expert_tensors(experts, module_or_weights, who)
    if set(new) != set(slots):
        raise ValueError(f"{who}: expected the tensors {sorted(slots)} of {type(experts).__name__}, got {sorted(new)}")
    for name, value in new.items():
        want = slots[name][0].shape
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(want):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{who}: {name} of expert {i} must have shape {tuple(want)}, got {got}")
    with torch.no_grad():
        for name, value in new.items():
            for view in slots[name]:
                view.copy_(value)


# --- the one generic step ------------------------------------------------------------------------


def _apply(layer: nn.Module, rows: list[_Row], who: str, router_args: dict[str, Any] | None,
           gen: torch.Generator | None = None) -> list[list[int]]:
    """Rebuild every per-expert tensor of the layer's routers and experts for the new `rows`, check
    the routers accept the new expert set, then assign everything (nothing changes on an error)."""
    E = _num_experts(layer, who)
    E_new = len(rows)
    sources = [list(r.sources) for r in rows]
    requested = dict(router_args or {})
    experts = layer.experts
    plans: list[tuple[nn.Module, dict[str, Tensor], dict[str, Any]]] = []
    for router in _routers(layer):
        specs = _specs(router, f"router {_router_label(router)}", who)
        args = _router_args(router, sources, requested, E_new, who)
        plans.append((router, {n: _rebuild(t, d, b, E, rows, gen) for n, (t, d, b) in specs.items()}, args))
    specs = _specs(experts, f"experts {type(experts).__name__}", who)
    plans.append((experts, {n: _rebuild(t, d, b, E, rows, gen) for n, (t, d, b) in specs.items()},
                  {"num_experts": E_new}))
    for module, tensors, args in plans:
        for name, value in tensors.items():
            _assign(module, name, value)
        for k, v in args.items():
            setattr(module, k, v)
    return sources


def _router_args(router: nn.Module, sources: list[list[int]], requested: dict[str, Any], E_new: int,
                 who: str) -> dict[str, Any]:
    """The router arguments to set for the new expert set, checked by building the router from them."""
    hook = getattr(router, "expert_args", None)
    args = {**(hook(sources, requested) if hook is not None else {}), **requested, "num_experts": E_new}
    try:
        config = router_config(router)
    except TypeError:  # not a registered router: only its k can be checked
        config = None
    if config is None:
        k = getattr(router, "k", None)
        if isinstance(k, int) and k > E_new:
            raise ValueError(f"{who}: router {type(router).__name__} has k={k} > the new number of experts "
                             f"{E_new}")
        unknown = sorted(a for a in args if not hasattr(router, a))
        if unknown:
            raise ValueError(f"{who}: router {type(router).__name__} has no arguments {unknown}")
        return args
    unknown = sorted(a for a in args if a not in config["args"])
    if unknown:
        raise ValueError(f"{who}: router {_router_label(router)} has no arguments {unknown}; "
                         f"it has {sorted(config['args'])}")
    try:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global RNG as it was
            build_router(config["name"], **{**config["args"], **args})
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{who}: router {_router_label(router)} cannot route over the new {E_new} experts: {err} "
            "(pass router_args=... to change its arguments with the expert set)"
        ) from None
    return args


def _rebuild(t: Tensor, dim: int, blocks: int, E: int, rows: list[_Row], gen: torch.Generator | None) -> Tensor:
    """The tensor for the new experts: each of its `blocks` blocks of E rows along `dim` rebuilt row by
    row; rows after the blocks (e.g. null experts) kept."""
    x = t.detach().movedim(dim, 0)
    parts = [_new_rows(x[b * E:(b + 1) * E], rows, gen) for b in range(blocks)]
    if x.shape[0] > blocks * E:
        parts.append(x[blocks * E:])
    return torch.cat(parts).movedim(0, dim).contiguous()


def _new_rows(block: Tensor, rows: list[_Row], gen: torch.Generator | None) -> Tensor:
    """block [E, ...] -> [E_new, ...]: row j = sum_i w_ji block[i] (a copy when one source), or fresh."""
    out = []
    std = None
    for r in rows:
        if len(r.sources) == 1:
            out.append(block[r.sources[0]])
        elif r.sources:
            w = torch.tensor(r.weights, dtype=torch.float32, device=block.device)
            w = w.view(-1, *([1] * (block.dim() - 1)))
            out.append((w * block[list(r.sources)].float()).sum(dim=0).to(block.dtype))
        elif r.init == "zeros" or not block.is_floating_point():
            out.append(torch.zeros_like(block[0]))
        else:
            if std is None:
                std = float(block.float().std()) if block.numel() > 1 else 0.0
            fresh = torch.randn(block.shape[1:], generator=gen, dtype=torch.float32) * std
            out.append(fresh.to(device=block.device, dtype=block.dtype))
    return torch.stack(out)


def _assign(module: nn.Module, dotted: str, value: Tensor) -> None:
    """Put `value` where the tensor `dotted` was, as the same kind (parameter with its requires_grad,
    or buffer with its persistence)."""
    owner, name = _owner(module, dotted)
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = value
    if isinstance(owner, nn.Linear) and name == "weight":
        owner.out_features, owner.in_features = value.shape


# --- reading the layer and the declarations -----------------------------------------------------


def _routers(layer: nn.Module) -> list[nn.Module]:
    """The layer's routers: `routers` (one per iteration) or `router`."""
    routers = getattr(layer, "routers", None)
    if isinstance(routers, nn.ModuleList | list | tuple):
        return list(routers)
    return [layer.router]


def _num_experts(layer: nn.Module, who: str) -> int:
    experts = getattr(layer, "experts", None)
    if experts is None or not hasattr(layer, "router") and not hasattr(layer, "routers"):
        raise TypeError(f"{who}: expected an MoE layer (with `router` and `experts`), got {type(layer).__name__}")
    E = getattr(experts, "num_experts", None)
    if not isinstance(E, int):
        raise TypeError(f"{who}: experts {type(experts).__name__} has no integer `num_experts`")
    for router in _routers(layer):
        if getattr(router, "num_experts", E) != E:
            raise ValueError(f"{who}: router {_router_label(router)} routes over {router.num_experts} experts "
                             f"but the experts are {E}")
    return E


def _router_label(router: nn.Module) -> str:
    name = getattr(type(router), "router_name", None)
    return f"{type(router).__name__} ({name!r})" if name else type(router).__name__


def _specs(module: nn.Module, label: str, who: str) -> dict[str, tuple[Tensor, int, int]]:
    """{name: (tensor, dim, blocks)} of the module's declared per-expert tensors that exist."""
    declared = getattr(type(module), "expert_dims", None)
    if declared is None:
        kind = NotImplementedError if label.startswith("experts") else ValueError
        raise kind(
            f"{who}: {label} cannot change its expert set: it declares no per-expert tensors "
            "(`expert_dims`); see docs/surgery.md"
        )
    out = {}
    for name, spec in declared.items():
        owner, attr = _owner(module, name, missing_ok=True)
        t = getattr(owner, attr, None) if owner is not None else None
        if not isinstance(t, Tensor):
            continue  # optional tensor (e.g. top-k's noise_weight only with noise="noisy")
        dim, blocks = (spec, 1) if isinstance(spec, int) else spec
        out[name] = (t, dim, blocks)
    return out


def _owner(module: nn.Module, dotted: str, missing_ok: bool = False) -> tuple[nn.Module | None, str]:
    path, _, name = dotted.rpartition(".")
    try:
        return (module.get_submodule(path) if path else module), name
    except AttributeError:
        if missing_ok:
            return None, name
        raise


def _slot(t: Tensor, dim: int, blocks: int, E: int, i: int) -> list[Tensor]:
    """Views of expert i's rows in each block of t."""
    x = t.detach().movedim(dim, 0)
    return [x[b * E + i] for b in range(blocks)]


def _expert_tensors(experts: nn.Module, given: nn.Module | dict[str, Tensor], who: str) -> dict[str, Tensor]:
    """{per-expert tensor name: one expert's slice} from a dict, a dense MLP or a one-expert module."""
    if isinstance(given, dict):
        return dict(given)
    if not isinstance(given, nn.Module):
        raise TypeError(f"{who}: expected a dict of tensors or an nn.Module, got {type(given).__name__}")
    if type(given) is type(experts):
        if getattr(given, "num_experts", None) != 1:
            raise ValueError(f"{who}: a {type(given).__name__} module must hold exactly 1 expert, "
                             f"got {getattr(given, 'num_experts', None)}")
        specs = _specs(given, f"experts {type(given).__name__}", who)
        return {name: _slot(t, d, b, 1, 0)[0] for name, (t, d, b) in specs.items()}
    linears = {n: getattr(given, n, None) for n in ("gate_proj", "up_proj", "down_proj")}
    if not all(isinstance(v, nn.Linear) or v is None for v in linears.values()) or linears["down_proj"] is None:
        raise TypeError(f"{who}: expected a dict of tensors, a {type(experts).__name__} with one expert, or an "
                        f"MLP with gate_proj/up_proj/down_proj linears; got {type(given).__name__}")
    mine = getattr(experts, "activation", None)
    theirs = getattr(given, "activation", mine)
    if theirs != mine:
        raise ValueError(f"{who}: the new expert's activation {theirs!r} differs from the experts' {mine!r}")
    gated = getattr(experts, "gated", True)
    if gated != (linears["gate_proj"] is not None):
        raise ValueError(f"{who}: the experts are {'gated' if gated else 'not gated'} but the module "
                         f"{'has no' if gated else 'has a'} gate_proj")
    out = {"down_proj": linears["down_proj"].weight.detach()}
    if gated:
        out["gate_up_proj"] = torch.cat([linears["gate_proj"].weight.detach(), linears["up_proj"].weight.detach()])
    else:
        out["up_proj"] = linears["up_proj"].weight.detach()
    return out


def _id_list(ids: Any, E: int, who: str, field: str) -> list[int]:
    """ids as a list of ints in [0, E) (a 1-d integer tensor or a sequence of ints)."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{who}: {field} must be a 1-d integer tensor or a list of ints, got {ids!r}")
        ids = ids.tolist()
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ValueError(f"{who}: {field} must be a list of expert ids, got {ids!r}")
    out = []
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{who}: {field} must hold integer expert ids, got {v!r}")
        if not 0 <= v < E:
            raise ValueError(f"{who}: expert id {v} in {field} is out of range [0, {E})")
        out.append(v)
    return out


def _duplicates(ids: list[int]) -> list[int]:
    """The ids that occur more than once, sorted."""
    return sorted(e for e, n in Counter(ids).items() if n > 1)


def _parse_int(text: str, who: str, init: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{who}: init must be one of {list(INITS)}, got {init!r}") from None


__all__ = ["add_experts", "keep_experts", "merge_experts", "replace_expert"]
