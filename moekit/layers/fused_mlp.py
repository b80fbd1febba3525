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

from moekit.layers.activations import get_activation


def _act_grad(name: str, grad: Tensor, x: Tensor) -> Tensor:
    """d act(x) / dx * grad for the named activation."""
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, x, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, x, 0)
    raise ValueError(f"no fused backward for activation {name!r}")


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) for every expert with at least one row."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def _forward(x: Tensor, w1: Tensor, w2: Tensor, segs, act: str, gated: bool, keep_h: bool):
    N = x.shape[0]
    F_ = w2.shape[2]
    y = x.new_empty(N, w2.shape[1])
    h_all = x.new_empty(N, w1.shape[1]) if keep_h else None
    act_fn = get_activation(act)
    for e, s, t in segs:
        h = torch.mm(x[s:t], w1[e].t(), out=h_all[s:t]) if keep_h else torch.mm(x[s:t], w1[e].t())
        a = act_fn(h[:, :F_]) * h[:, F_:] if gated else act_fn(h)
        torch.mm(a, w2[e].t(), out=y[s:t])
    return y, h_all


class FusedExpertMLPFn(torch.autograd.Function):
    """ys[s:t] = down_e(act(gate_e x) * up_e x) for each expert e's slice [s, t) of sorted rows x."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], act: str, gated: bool) -> Tensor:  # type: ignore[override]
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
        act_fn = get_activation(act)
        gy = gy.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw1 = torch.zeros_like(w1) if ctx.needs_input_grad[1] else None
        gw2 = torch.zeros_like(w2) if ctx.needs_input_grad[2] else None
        for e, s, t in ctx.segs:
            he, gye = h[s:t], gy[s:t]
            if gated:
                g, u = he[:, :F_], he[:, F_:]
                ag = act_fn(g)
                a = ag * u
            else:
                a = act_fn(he)
            if gw2 is not None:
                torch.mm(gye.t(), a, out=gw2[e])  # [D, n] x [n, F] -> [D, F]
            ga = torch.mm(gye, w2[e])  # [n, D] x [D, F] -> [n, F]
            if gated:
                gh = torch.cat([_act_grad(act, ga * u, g), ga * ag], dim=1)  # [n, 2F]
            else:
                gh = _act_grad(act, ga, he)
            if gw1 is not None:
                torch.mm(gh.t(), x[s:t], out=gw1[e])  # [2F, n] x [n, D] -> [2F, D]
            if gx is not None:
                torch.mm(gh, w1[e], out=gx[s:t])  # [n, 2F] x [2F, D] -> [n, D]
        return gx, gw1, gw2, None, None, None


def fused_expert_mlp(x: Tensor, w1: Tensor, w2: Tensor, counts: list[int], act: str, gated: bool) -> Tensor:
    """x: [N, D] rows sorted by expert, w1: [E, 2F or F, D], w2: [E, D, F], counts: rows per expert -> [N, D]."""
    if sum(counts) != x.shape[0]:
        raise ValueError(f"fused_expert_mlp: counts sum to {sum(counts)} but x has {x.shape[0]} rows")
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return FusedExpertMLPFn.apply(x, w1, w2, counts, act, gated)
    return _forward(x, w1, w2, _segments(counts), act, gated, keep_h=False)[0]
