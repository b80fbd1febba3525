"""Dispatch backends: how tokens reach their experts. Chosen by name; every backend gives the
results of `eager` (the reference) within floating-point tolerance, gradients included.

A backend is `fn(x, expert_ids, weights, experts) -> Tensor[T, D]`, where `experts` exposes
`num_experts`, `gated`, `act`, the fused weights (`gate_up_proj [E, 2F, D]` or `up_proj [E, F, D]`,
and `down_proj [E, D, F]`). Slots with id -1 are skipped (no compute, zero contribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.layers.fused_mlp import fused_expert_mlp

Backend = Callable[[Tensor, Tensor, Tensor, "torch.nn.Module"], Tensor]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Register a dispatch backend under `name`."""

    def deco(fn: Backend) -> Backend:
        _BACKENDS[name] = fn
        return fn

    return deco


def list_backends() -> list[str]:
    """Names of the dispatch backends, `auto` included."""
    return sorted([*_BACKENDS, "auto"])


def get_backend(name: str) -> Backend:
    """The backend `name`; an unknown name lists the known ones."""
    if name == "auto":
        return _auto
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown dispatch backend {name!r}; known: {', '.join(list_backends())}") from None


def _first_matrix(experts) -> Tensor:
    return experts.gate_up_proj if experts.gated else experts.up_proj


def _expert_mlp(h: Tensor, experts) -> Tensor:
    """Activation of the first projection's output: act(gate) * up when gated, else act(h)."""
    if experts.gated:
        gate, up = h.chunk(2, dim=-1)
        return experts.act.glu(gate, up)
    return experts.act(h)


@register_backend("eager")
def eager(x: Tensor, expert_ids: Tensor, weights: Tensor, experts) -> Tensor:
    """Reference: a plain loop over experts, gather -> MLP -> weighted scatter-add. Simplest correct code.
    An expert's rows come by slot, then token: the order of transformers' eager experts."""
    out = torch.zeros_like(x)
    W1, W2 = _first_matrix(experts), experts.down_proj
    for e in range(experts.num_experts):
        slot, tok = torch.where(expert_ids.t() == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ W1[e].t()  # [n, D] x [D, 2F] -> [n, 2F]
        y = _expert_mlp(h, experts) @ W2[e].t()  # [n, F] x [F, D] -> [n, D]
        out = out.index_add(0, tok, _weighted(y, weights[tok, slot]))
    return out


@dataclass
class Plan:
    """Token-slots sorted by expert: `token[i]` is the token of sorted slot i; `counts[e]` rows per expert.
    Within an expert, rows come by slot, then token (as in `eager` and transformers: a GEMM's result for
    a row may depend on where the row sits in the block, rarely, in the last bit)."""

    order: Tensor  # [N] indices into the flattened [T*k] slots, sorted by expert (empty slots removed)
    token: Tensor  # [N] token index of each sorted slot
    counts: list[int]  # [E] rows per expert (host ints: one sync per layer call)
    expert_ids: Tensor  # [T, k] the slots planned


def plan(expert_ids: Tensor, num_experts: int) -> Plan:
    """Sort the [T, k] slots by expert id, then slot, then token; slots of -1 sort first and are cut off."""
    T, k = expert_ids.shape
    flat = expert_ids.t().reshape(-1)  # [k*T], slot-major
    try:
        counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()
    except RuntimeError:  # a negative id below -1
        raise ValueError(f"expert ids must be in [-1, {num_experts}), found {int(flat.min())}") from None
    if len(counts) > num_experts + 1:
        raise ValueError(f"expert ids must be in [-1, {num_experts}), found {int(flat.max())}")
    by_slot = torch.argsort(flat, stable=True)[counts[0]:]  # positions j*T + t
    order = (by_slot % T) * k + by_slot // T  # -> positions t*k + j in the row-major [T*k] slots
    return Plan(order=order, token=order // k, counts=counts[1:], expert_ids=expert_ids)


def _weighted(y: Tensor, w: Tensor) -> Tensor:
    """y [n, D] times its slots' weights w [n], in the wider of the two dtypes, rounded to y's dtype
    (routing weights kept in float32 scale 16-bit expert outputs before rounding, as in transformers)."""
    return (y * w.unsqueeze(-1)).to(y.dtype)


def _combine(ys: Tensor, p: Plan, weights: Tensor, T: int) -> Tensor:
    """Weighted sum of sorted expert outputs ys [N, D] back to tokens -> [T, D].

    Each token's slots are added one at a time in increasing expert order, rounding after each
    add: the order and rounding of `eager` (one index_add per expert), so 16-bit results do not
    depend on the backend. (One index_add over repeated indices may accumulate in a wider type.)
    """
    k, D = weights.shape[1], ys.shape[1]
    N = ys.shape[0]
    contrib = _weighted(ys, weights.reshape(-1)[p.order])  # [N, D]
    if N < T * k:  # empty slots read a zero row
        contrib = torch.cat([contrib, contrib.new_zeros(1, D)])
    # rank of every slot within its token's row by expert id (-1 slots first); distinct within a row
    in_row = torch.argsort(p.expert_ids, dim=1, stable=True)  # [T, k]
    ar = torch.arange(max(k, N), device=in_row.device)
    rank = torch.empty_like(in_row).scatter_(1, in_row, ar[:k].expand(T, k))
    target = p.token * k + rank.reshape(-1)[p.order]  # [N] place of each sorted slot in [T * k]
    source = torch.full((T * k,), N, dtype=torch.long, device=ar.device).scatter_(0, target, ar[:N])
    dense = contrib.index_select(0, source).view(T, k, D)  # [T, k, D] by token, then expert id
    out = dense[:, 0]
    for r in range(1, k):
        out = out + dense[:, r]
    return out


@register_backend("loop")
def loop(x: Tensor, expert_ids: Tensor, weights: Tensor, experts) -> Tensor:
    """Sort slots by expert, then per expert: gate_up -> activation -> down on its contiguous slice,
    all in one autograd node (cache-sized intermediates; weight gradients written in place, no
    per-expert full-size gradient)."""
    p = plan(expert_ids, experts.num_experts)
    xs = x.index_select(0, p.token)  # [N, D]
    ys = fused_expert_mlp(xs, _first_matrix(experts), experts.down_proj, p.counts, experts.act, experts.gated)
    return _combine(ys, p, weights, x.shape[0])


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch.nn.functional.grouped_mm exists in this torch build."""
    return hasattr(F, "grouped_mm")


@register_backend("grouped")
def grouped(x: Tensor, expert_ids: Tensor, weights: Tensor, experts) -> Tensor:
    """Sort slots by expert and run each projection as one `torch.nn.functional.grouped_mm`."""
    if not grouped_mm_available(x.device, x.dtype):
        raise RuntimeError(
            "dispatch backend 'grouped' needs torch.nn.functional.grouped_mm (torch >= 2.9); "
            "upgrade torch or use backend='loop'"
        )
    p = plan(expert_ids, experts.num_experts)
    xs = x.index_select(0, p.token)
    offs = torch.tensor(p.counts, device=x.device).cumsum(0).to(torch.int32)
    h = F.grouped_mm(xs, _first_matrix(experts).transpose(1, 2), offs=offs)  # [N, 2F]
    ys = F.grouped_mm(_expert_mlp(h, experts), experts.down_proj.transpose(1, 2), offs=offs)  # [N, D]
    return _combine(ys, p, weights, x.shape[0])


def _auto(x: Tensor, expert_ids: Tensor, weights: Tensor, experts) -> Tensor:
    """Pick by device and shape (see docs/performance.md): grouped_mm on CUDA in 16-bit, else loop."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and grouped_mm_available(x.device, x.dtype):
        return grouped(x, expert_ids, weights, experts)
    return loop(x, expert_ids, weights, experts)
