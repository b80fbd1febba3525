"""Data parallelism around expert-parallel MoE layers, for moekit's LM.

Every rank holds a slice of the global batch, a replica of every non-expert parameter (embeddings,
attention, norms, routers, shared experts) and E / P experts of each MoE layer (`shard_moe`), as in
GShard (Lepikhin et al. 2020) where the expert-parallel group is the data-parallel group. After the
backward:

- a replicated parameter holds the gradient of this rank's tokens only: `sync_gradients` sums it
  over the ranks (an all-reduce, what DDP does, summing instead of averaging);
- an expert parameter already holds the gradient of every rank's tokens routed to it (the all-to-all
  backward brought them): it is not all-reduced.

With each rank's loss its share of the global loss (`share_of_mean` for a mean over tokens; the MoE
auxiliary losses already are shares inside `ExpertParallelMoE`), the summed gradients are those of the
one-process run on the concatenated batch, so the same optimizer steps give the same parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.ep import ExpertParallelExperts, shard_moe
from moekit.layers.moe import MoE


def shard_model(model: nn.Module, group: Any = None) -> nn.Module:
    """Replace, in place, every one-process `MoE` layer of `model` (a moekit `MoELM` or any module tree)
    by its `shard_moe` for this rank of `group`; returns `model`. Every rank must pass the same model
    (same seed or checkpoint). Raises ValueError on layers whose experts do not split over the ranks."""
    if getattr(getattr(model, "config", None), "share_blocks", False):
        raise ValueError("shard_model: share_blocks=True (one MoE layer reused by every block) is not supported")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is MoE]
    for name, moe in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, shard_moe(moe, group))
    return model


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to expert-parallel shards (not replicated over the ranks)."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            names |= {f"{prefix}.{n}" for n, _ in m.named_parameters()}
    return names


def sync_gradients(model: nn.Module, group: Any = None) -> None:
    """Sum the gradients of every replicated parameter over the ranks of `group` (one flat all-reduce);
    expert-parallel parameters are left alone (their gradients already cover every rank's tokens).
    A replicated parameter without a gradient on this rank gets zeros, so every rank reduces the same set."""
    experts = expert_parameter_names(model)
    params = [p for n, p in model.named_parameters() if n not in experts and p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def share_of_mean(mean: Tensor, count: int, group: Any = None) -> Tensor:
    """mean * count / (the counts of all ranks summed): this rank's share of the global mean, given its
    local mean over `count` items (e.g. the LM's mean token cross-entropy); the shares sum to the mean
    over every rank's items."""
    total = torch.tensor(count, dtype=torch.long, device=mean.device)
    dist.all_reduce(total, group=group)
    return mean * (count / max(int(total), 1))


def global_sum(value: Tensor, group: Any = None) -> float:
    """A scalar summed over the ranks (e.g. the ranks' loss shares -> the global loss, for logging)."""
    t = value.detach().reshape(()).clone()
    dist.all_reduce(t, group=group)
    return float(t)


__all__ = ["expert_parameter_names", "global_sum", "shard_model", "share_of_mean", "sync_gradients"]
