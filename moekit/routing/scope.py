"""Batch scope: routing statistics taken over a batch that several processes hold together.

Under expert parallelism (moekit.distributed) each rank routes its own slice of the batch with a
replicated router. Balance losses and DeepSeek-V3's selection-bias loads are statistics of the whole
batch (Fedus et al. 2021, eq. 4: f and P are averages over all tokens of the batch), so inside
`batch_scope(group)` the helpers below reduce them over the ranks of `group`:

- counts (`batch_sum`: expert loads, token totals) are summed over the ranks, without gradient;
- means over tokens (`batch_mean`) become this rank's share of the whole batch's mean: the sum of
  its rows divided by the total number of rows. The shares of the ranks sum to the one-process mean,
  and so do their gradients: a loss built from them (linear in the shares) is this rank's part of the
  one-process loss on the concatenated batch, and the parts' sum is that loss.

Outside a scope every helper is the plain one-process computation. The scope is a context variable
set for the duration of one layer's forward (`ExpertParallelMoE`), not a global that holds results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

_GROUP: ContextVar[Any] = ContextVar("moekit_batch_scope", default=None)


@contextmanager
def batch_scope(group: Any) -> Iterator[None]:
    """Within the block, routing statistics are taken over the batch the ranks of the
    torch.distributed process group `group` hold together (None: the default group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("batch_scope: torch.distributed is not initialised (call init_process_group first)")
    token = _GROUP.set(dist.group.WORLD if group is None else group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def in_batch_scope() -> bool:
    """Whether a `batch_scope` is active."""
    return _GROUP.get() is not None


def batch_sum(t: Tensor) -> Tensor:
    """t summed over the ranks of the active scope (a new tensor, no gradient); t itself outside one."""
    group = _GROUP.get()
    if group is None:
        return t
    import torch.distributed as dist

    total = t.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def batch_rows(n: int, device: torch.device | str = "cpu") -> int:
    """The rows the ranks of the active scope hold together, given this rank's n (n outside a scope)."""
    if _GROUP.get() is None:
        return n
    return int(batch_sum(torch.tensor(n, dtype=torch.long, device=device)))


def batch_mean(values: Tensor) -> Tensor:
    """values [R, ...] -> [...]: the mean over the R rows; in a scope this rank's share of the mean over
    every rank's rows (its rows' sum divided by the total row count; differentiable)."""
    if _GROUP.get() is None:
        return values.mean(dim=0)
    return values.sum(dim=0) / max(batch_rows(values.shape[0], values.device), 1)
