"""Per-expert fused expert MLP over rows sorted by expert: for each expert's contiguous slice,
gate_up -> activation -> down, with every intermediate the size of one expert's slice (cache-sized),
inside one autograd node whose backward writes each expert's weight gradients straight into one
[E, O, I] buffer (no per-expert full-size zero gradient, no full-size intermediates).

Saved for backward: the first projection's output h [N, 2F] (or [N, F]); the activation is
recomputed per expert in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.layers.activations import Activation, get_activation


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) for every expert with at least one row."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def check_sorted_rows(who: str, x: Tensor, counts: list[int], w1: Tensor) -> None:
    """Raise ValueError unless `counts` has one entry per expert of w1 [E, O, I] and sums to x's rows."""
    if len(counts) != w1.shape[0]:
        raise ValueError(f"{who}: counts has {len(counts)} entries but the weights hold {w1.shape[0]} experts")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"{who}: counts sum to {sum(counts)} but x has {x.shape[0]} rows")


def _forward(x: Tensor, w1: Tensor, w2: Tensor, segs, act: Activation, gated: bool, keep_h: bool):
    N = x.shape[0]
    F_ = w2.shape[2]
    y = x.new_empty(N, w2.shape[1])
    h_all = x.new_empty(N, w1.shape[1]) if keep_h else None
    for e, s, t in segs:
        h = torch.mm(x[s:t], w1[e].t(), out=h_all[s:t]) if keep_h else torch.mm(x[s:t], w1[e].t())
        a = act.glu(h[:, :F_], h[:, F_:]) if gated else act(h)
        torch.mm(a, w2[e].t(), out=y[s:t])
    return y, h_all


class FusedExpertMLPFn(torch.autograd.Function):
    """ys[s:t] = down_e(act(gate_e x) * up_e x) for each expert e's slice [s, t) of sorted rows x."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], act: Activation, gated: bool) -> Tensor:  # type: ignore[override]
        segs = _segments(counts)
        y, h = _forward(x, w1, w2, segs, act, gated, keep_h=True)
        ctx.segs, ctx.act, ctx.gated = segs, act, gated
        ctx.save_for_backward(x, w1, w2, h)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, w1, w2, h = ctx.saved_tensors
        act, gated = ctx.act, ctx.gated
        F_ = w2.shape[2]
        gy = gy.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw1 = torch.zeros_like(w1) if ctx.needs_input_grad[1] else None
        gw2 = torch.zeros_like(w2) if ctx.needs_input_grad[2] else None
        for e, s, t in ctx.segs:
            he, gye = h[s:t], gy[s:t]
            ga = torch.mm(gye, w2[e])  # [n, D] x [D, F] -> [n, F]
            if gated:  # the activation's output and its gradient from one act(gate)
                a, d_gate, d_up = act.glu_with_grad(ga, he[:, :F_], he[:, F_:])
                gh = torch.cat([d_gate, d_up], dim=1)  # [n, 2F]
            else:
                a, gh = act(he), act.grad(ga, he)
            if gw2 is not None:
                torch.mm(gye.t(), a, out=gw2[e])  # [D, n] x [n, F] -> [D, F]
            if gw1 is not None:
                torch.mm(gh.t(), x[s:t], out=gw1[e])  # [2F, n] x [n, D] -> [2F, D]
            if gx is not None:
                torch.mm(gh, w1[e], out=gx[s:t])  # [n, 2F] x [2F, D] -> [n, D]
        return gx, gw1, gw2, None, None, None


def fused_expert_mlp(
    x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], act: Activation | str, gated: bool
) -> Tensor:
    """x: [N, D] rows sorted by expert, w1: [E, 2F or F, D], w2: [E, D, F], counts: rows per expert -> [N, D].
    `act`: an `Activation` (e.g. `Experts.act`) or the name of one without arguments."""
    act = get_activation(act) if isinstance(act, str) else act
    check_sorted_rows("fused_expert_mlp", x, counts, w1)
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return FusedExpertMLPFn.apply(x, w1, w2, counts, act, gated)
    return _forward(x, w1, w2, _segments(counts), act, gated, keep_h=False)[0]
