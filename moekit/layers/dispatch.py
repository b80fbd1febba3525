"""Dispatch backends: how tokens reach their experts. Chosen by name; every backend gives the
results of `eager` (the reference) within floating-point tolerance, gradients included.

A backend is `fn(x, plan, weights, experts) -> Tensor[T, D]`: x [T, D], the token `Plan` of the experts
the layer owns (`plan(expert_ids, E, offset=..., num_local=...)`: experts [offset, offset + E_local) of a
global E; all E in one process), the routing weights [T, k], and `experts`, which exposes `gated`, `act`
and the fused weights of its experts only (`gate_up_proj [E_local, 2F, D]` or `up_proj [E_local, F, D]`,
and `down_proj [E_local, D, F]`). Slots with id -1, and slots of experts the layer does not own, are
skipped (no compute, zero contribution).

The sorted backends run in three stages, the seam of expert parallelism (DESIGN.md, contract 3):
`gather` (the plan's rows [N, D], sorted by expert), an expert-compute stage on contiguous per-expert
slices (`loop_compute`, `grouped_compute`: `fn(xs, counts, W1, W2, experts) -> ys`), and `combine` (the
weighted sum back to tokens). Expert parallelism exchanges the gathered rows between ranks before the
compute stage and the outputs back before `combine` (docs/performance.md); routers and the layer are
untouched.

Input and weights share one dtype (`Experts.forward` checks it), except inside `torch.autocast`: there
every backend runs the expert matmuls in the autocast dtype, as `nn.Linear` would (`_operands`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.layers.fused_mlp import check_sorted_rows, fused_expert_mlp
from moekit.utils.registry import Registry

Backend = Callable[[Tensor, "Plan", Tensor, "torch.nn.Module"], Tensor]
BACKENDS: Registry[Backend] = Registry("dispatch backend")


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Decorator: register a dispatch backend under `name` (unique)."""
    return BACKENDS.register(name)


def list_backends() -> list[str]:
    """Names of the dispatch backends, `auto` included."""
    return BACKENDS.list()


def get_backend(name: str) -> Backend:
    """The backend `name`; an unknown name lists the known ones (`UnknownNameError`, a ValueError)."""
    return BACKENDS.get(name)


def _first_matrix(experts) -> Tensor:
    return experts.gate_up_proj if experts.gated else experts.up_proj


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype of the `torch.autocast` region enabled for x's device, or None outside one."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _operands(x: Tensor, experts) -> tuple[Tensor, Tensor, Tensor, AbstractContextManager]:
    """(x, first matrix, down_proj, context) for the expert matmuls. Inside `torch.autocast` the three
    tensors are cast to its dtype, as autocast casts `nn.Linear`'s (differentiable: gradients reach the
    weights in their own dtype), and the context turns autocast off for the kernels autocast does not
    know (`grouped_mm`, the fused loop's `mm(out=)`); elsewhere the tensors as they are, no context."""
    W1, W2 = _first_matrix(experts), experts.down_proj
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, W1, W2, nullcontext()
    return x.to(dtype), W1.to(dtype), W2.to(dtype), torch.autocast(x.device.type, enabled=False)


def _expert_mlp(h: Tensor, experts) -> Tensor:
    """Activation of the first projection's output: act(gate) * up when gated, else act(h)."""
    if experts.gated:
        gate, up = h.chunk(2, dim=-1)
        return experts.act.glu(gate, up)
    return experts.act(h)


def check_expert_slice(who: str, num_experts: int, offset: int, num_local: int) -> None:
    """Raise ValueError unless [offset, offset + num_local) is a non-empty range of expert ids in [0, num_experts)."""
    for name, v in (("expert_offset", offset), ("num_local_experts", num_local)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{who}: {name} must be an integer, got {v!r}")
    if num_local < 1 or offset < 0 or offset + num_local > num_experts:
        raise ValueError(
            f"{who}: experts [expert_offset, expert_offset + num_local_experts) must lie in [0, {num_experts}) "
            f"with at least one expert, got expert_offset={offset}, num_local_experts={num_local}"
        )


@dataclass
class Plan:
    """Token-slots of the planned experts, sorted by expert: `token[i]` is the token of sorted slot i;
    `counts[e]` rows of expert `offset + e`. Within an expert, rows come by slot, then token (as in `eager`
    and transformers: a GEMM's result for a row may depend on where the row sits in the block, rarely, in
    the last bit). Slots of -1 and of experts outside [offset, offset + len(counts)) are not in the plan."""

    order: Tensor  # [N] indices into the flattened [T*k] slots, sorted by expert (unplanned slots removed)
    token: Tensor  # [N] token index of each sorted slot
    counts: list[int]  # [E_local] rows per planned expert (host ints: one sync per layer call)
    expert_ids: Tensor  # [T, k] the slots planned (global expert ids)
    offset: int = 0  # global id of the first planned expert


def plan(expert_ids: Tensor, num_experts: int, *, offset: int = 0, num_local: int | None = None) -> Plan:
    """Sort the [T, k] slots of experts [offset, offset + num_local) (default: all `num_experts`) by expert
    id, then slot, then token. Ids must be in [-1, num_experts); slots of -1 and of other experts are cut off."""
    num_local = num_experts - offset if num_local is None else num_local
    whole = offset == 0 and num_local == num_experts
    if not whole:
        check_expert_slice("plan", num_experts, offset, num_local)
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [T*k], row-major: position t*k + j (a view, no copy)
    shifted = flat + 1  # [T*k], ids + 1: -1 slots are 0
    try:
        counts = torch.bincount(shifted, minlength=num_experts + 1).tolist()
    except RuntimeError:  # a negative id below -1
        raise ValueError(f"expert ids must be in [-1, {num_experts}), found {int(flat.min())}") from None
    if len(counts) > num_experts + 1:
        raise ValueError(f"expert ids must be in [-1, {num_experts}), found {int(flat.max())}")
    if whole:  # every slot but the -1 ones
        local, start, end = counts[1:], counts[0], None
    else:
        local = counts[1 + offset : 1 + offset + num_local]
        start = counts[0] + sum(counts[1 : 1 + offset])  # sorted position of expert `offset`'s first slot
        end = start + sum(local)
    # key (id + 1) * k + slot: sorted by expert, then slot, then token (stable); -1 slots first
    key = shifted.view(-1, k).mul_(k).add_(torch.arange(k, device=flat.device)).view(-1)
    order = torch.argsort(key, stable=True)[start:end]  # positions t*k + j in the row-major [T*k] slots
    return Plan(order=order, token=order // k, counts=local, expert_ids=expert_ids, offset=offset)


@register_backend("eager")
def eager(x: Tensor, p: Plan, weights: Tensor, experts) -> Tensor:
    """Reference: a plain loop over the planned experts, gather -> MLP -> weighted scatter-add. Simplest
    correct code (it reads only which experts the plan covers, not its sort). An expert's rows come by
    slot, then token: the order of transformers' eager experts."""
    x, W1, W2, _ = _operands(x, experts)
    out = torch.zeros_like(x)
    for e in range(len(p.counts)):  # local index e: global expert p.offset + e
        slot, tok = torch.where(p.expert_ids.t() == p.offset + e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ W1[e].t()  # [n, D] x [D, 2F] -> [n, 2F]
        y = _expert_mlp(h, experts) @ W2[e].t()  # [n, F] x [F, D] -> [n, D]
        out = out.index_add(0, tok, _weighted(y, weights[tok, slot]))
    return out


def gather(x: Tensor, p: Plan) -> Tensor:
    """Stage 1 of the sorted backends: the plan's rows of x [T, D] -> [N, D], sorted by expert."""
    return x.index_select(0, p.token)


def _weighted(y: Tensor, w: Tensor) -> Tensor:
    """y [n, D] times its slots' weights w [n], in the wider of the two dtypes, rounded to y's dtype
    (routing weights kept in float32 scale 16-bit expert outputs before rounding, as in transformers)."""
    return (y * w.unsqueeze(-1)).to(y.dtype)


# dtypes in which CPU index_add adds rows one by one in index order in the dtype itself (16-bit types may
# accumulate wider, then round once; CUDA's index_add uses atomics, in no fixed order)
_EXACT_INDEX_ADD = (torch.float32, torch.float64)


def combine(ys: Tensor, p: Plan, weights: Tensor, T: int) -> Tensor:
    """Stage 3 of the sorted backends: weighted sum of the plan's expert outputs ys [N, D] back to
    tokens -> [T, D] (weights [T, k]; slots outside the plan contribute zero).

    Each token's slots are added one at a time in increasing expert order, rounding after each
    add: the order and rounding of `eager` (one index_add per expert), so 16-bit results do not
    depend on the backend. In 16-bit dtypes one index_add over repeated indices may accumulate in a
    wider type, and on CUDA index_add adds in no fixed order, so those take an explicit per-rank sum;
    float32/64 on CPU take the single index_add (the rows are sorted by expert, so a token's slots are
    added in the same order and rounding, at about half the cost).
    """
    k, D = weights.shape[1], ys.shape[1]
    N = ys.shape[0]
    contrib = _weighted(ys, weights.reshape(-1)[p.order])  # [N, D]
    if ys.dtype in _EXACT_INDEX_ADD and ys.device.type == "cpu":  # adds a token's rows in order, rounding each
        return ys.new_zeros(T, D).index_add(0, p.token, contrib)
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


ExpertCompute = Callable[[Tensor, list[int], Tensor, Tensor, "torch.nn.Module"], Tensor]


def run_sorted(x: Tensor, p: Plan, weights: Tensor, experts, compute: ExpertCompute) -> Tensor:
    """A sorted backend: `gather` -> `compute(xs, counts, W1, W2, experts)` -> `combine`, with x and the
    weights in autocast's dtype inside `torch.autocast` (the compute stage runs with autocast off).
    Expert parallelism puts its exchange of rows between the stages (docs/performance.md)."""
    x, W1, W2, no_autocast = _operands(x, experts)
    xs = gather(x, p)  # [N, D]
    with no_autocast:
        ys = compute(xs, p.counts, W1, W2, experts)  # [N, D]
    return combine(ys, p, weights, x.shape[0])


def loop_compute(xs: Tensor, counts: list[int], W1: Tensor, W2: Tensor, experts) -> Tensor:
    """Expert compute of `loop`: xs [N, D] sorted by expert, counts [E_local], W1 [E_local, 2F or F, D],
    W2 [E_local, D, F] -> ys [N, D], per expert on its contiguous slice in one autograd node."""
    return fused_expert_mlp(xs, W1, W2, counts, experts.act, experts.gated)


@register_backend("loop")
def loop(x: Tensor, p: Plan, weights: Tensor, experts) -> Tensor:
    """Sort slots by expert, then per expert: gate_up -> activation -> down on its contiguous slice,
    all in one autograd node (cache-sized intermediates; weight gradients written in place, no
    per-expert full-size gradient)."""
    return run_sorted(x, p, weights, experts, loop_compute)


# The dtypes torch's grouped_mm takes (float64 is refused).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch.nn.functional.grouped_mm exists in this torch build and takes `dtype`."""
    return hasattr(F, "grouped_mm") and dtype in GROUPED_MM_DTYPES


# torch's grouped_mm needs every operand 16-byte aligned with a row stride (leading dimension) that
# is a multiple of 16 bytes: odd widths (F = 13 in fp32, F = 20 or D = 33 in bf16) fail without padding.
_GROUPED_MM_ALIGN = 16


def _aligned(t: Tensor) -> Tensor:
    """t [..., R, C] itself when its rows are contiguous, 16-byte aligned and a multiple of 16 bytes
    apart; else the same values and shape in a copy whose rows are padded with zeros to that stride
    (the padding is never read: shapes stay [..., R, C]). Differentiable."""
    a = _GROUPED_MM_ALIGN // t.element_size()
    if t.stride(-1) == 1 and t.stride(-2) % a == 0 and t.data_ptr() % _GROUPED_MM_ALIGN == 0:
        return t
    C = t.shape[-1]
    return F.pad(t, (0, -C % a))[..., :C]


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [N, I] rows sorted by group, b [G, O, I] -> [N, O] = a[rows of g] @ b[g].T for each group g,
    as one `grouped_mm` at any I and O: operands whose row stride the kernel cannot take are padded
    (`_aligned`), and so is the output's gradient, which the backward passes to `grouped_mm` again."""
    y = F.grouped_mm(_aligned(a), _aligned(b).transpose(1, 2), offs=offs)  # [N, O]
    if y.requires_grad:
        y.register_hook(_aligned)
    return y


def grouped_compute(xs: Tensor, counts: list[int], W1: Tensor, W2: Tensor, experts) -> Tensor:
    """Expert compute of `grouped`: each projection over all experts' slices as one `grouped_mm`
    (shapes as `loop_compute`). Raises when this torch has no grouped_mm or it does not take xs's dtype."""
    if not hasattr(F, "grouped_mm"):
        raise RuntimeError(
            "dispatch backend 'grouped' needs torch.nn.functional.grouped_mm (torch >= 2.9); "
            "upgrade torch or use backend='loop'"
        )
    if not grouped_mm_available(xs.device, xs.dtype):
        raise TypeError(
            f"dispatch backend 'grouped': torch's grouped_mm takes {', '.join(map(str, GROUPED_MM_DTYPES))}, "
            f"not {xs.dtype}; use backend='loop' (same results) or convert the layer"
        )
    check_sorted_rows("grouped_compute", xs, counts, W1)
    offs = torch.tensor(counts, device=xs.device).cumsum(0).to(torch.int32)
    h = _grouped_mm(xs, W1, offs)  # [N, 2F]
    return _grouped_mm(_expert_mlp(h, experts), W2, offs)  # [N, D]


@register_backend("grouped")
def grouped(x: Tensor, p: Plan, weights: Tensor, experts) -> Tensor:
    """Sort slots by expert and run each projection as one `torch.nn.functional.grouped_mm` (any D
    and F: rows are padded to the stride the kernel needs, see `_grouped_mm`)."""
    return run_sorted(x, p, weights, experts, grouped_compute)


def _auto(x: Tensor, p: Plan, weights: Tensor, experts) -> Tensor:
    """Pick by device and shape (see docs/performance.md): grouped_mm on CUDA in 16-bit (the input's
    dtype, or autocast's inside torch.autocast), else loop."""
    dtype = autocast_dtype(x) or x.dtype
    if x.is_cuda and dtype in (torch.bfloat16, torch.float16) and grouped_mm_available(x.device, dtype):
        return grouped(x, p, weights, experts)
    return loop(x, p, weights, experts)


register_backend("auto")(_auto)  # by device and dtype; not a backend of its own
