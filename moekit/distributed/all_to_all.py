"""All-to-all with variable splits as an autograd function (the token exchange of expert parallelism).

GShard (Lepikhin et al. 2020) and Switch Transformers (Fedus et al. 2021) place experts on different
devices and move each token to its expert's device with an all-to-all, and back after the experts. The
backward of an all-to-all is the all-to-all with the splits swapped: the gradient of every row goes back
to the rank that sent it. Runs on any torch.distributed backend with `all_to_all_single` (gloo, NCCL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def exchange_counts(counts: Tensor, group: Any) -> Tensor:
    """counts [P * n] (n numbers for each of the P ranks of `group`, in rank order) -> [P * n]: the n
    numbers each rank sent to this one, in rank order (no gradient)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> Tensor:
    """x [sum(in_splits), ...] -> [sum(out_splits), ...]: rows in_splits[r] go to rank r of `group`, and
    out_splits[r] rows arrive from rank r (stacked in rank order). Differentiable: the backward sends
    every row's gradient back where the row came from. Zero rows to or from a rank are allowed."""
    if x.shape[0] != sum(in_splits):
        raise ValueError(f"all_to_all: x has {x.shape[0]} rows but in_splits sum to {sum(in_splits)}")
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


__all__ = ["all_to_all", "exchange_counts"]
