"""Expert parallelism: each rank of a process group holds E / P of a layer's experts.

GShard (Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional Computation and Automatic
Sharding") and Switch Transformers (Fedus et al. 2021) shard the experts over devices: every device
routes its own tokens with a replicated router, sends each token-slot to the device that owns its
expert with an all-to-all, computes its local experts and returns the outputs with a second
all-to-all. Here, dropless (no capacity, as MegaBlocks, Gale et al. 2022): the per-destination counts
are exchanged first and `all_to_all_single` moves exactly the rows routed (variable splits).

Forward of one layer on a rank holding T tokens (P ranks, E experts, E_local = E / P on each):

    routing = router(x)                   # replicated router, batch statistics reduced over the group
    xs = gather(x, plan)                  # [N, D] token-slots sorted by expert, so by owning rank
    counts -> all_to_all                  # rows each rank will receive, per local expert
    xr = all_to_all(xs)                   # [N_recv, D] rows for this rank's experts
    yr = backend(xr)                      # the ordinary dispatch backend on the local expert shard
    ys = all_to_all(yr)                   # [N, D] back to the ranks that own the tokens
    y = combine(ys, plan, routing.weights)  # weighted sum per token, as in one process

The backward runs the same exchanges in reverse (`all_to_all`). With every rank holding a slice of one
batch, the outputs equal the one-process layer's on the concatenated batch, expert weights receive the
gradient of every rank's tokens (so it is complete on the owning rank), and each rank's auxiliary losses
are its share of the one-process losses (`moekit.routing.scope`): summing the ranks' losses gives the
one-process loss, and all-reducing (sum) the replicated parameters' gradients gives its gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.all_to_all import all_to_all, exchange_counts
from moekit.layers.dispatch import combine, gather, get_backend, plan
from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.moe import MoE
from moekit.routing.routing import Routing
from moekit.routing.scope import batch_scope


def group_size_rank(group: Any) -> tuple[int, int]:
    """(P, rank) of this process in `group` (None: the default group); raises when torch.distributed is
    not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (torchrun, init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def check_divisible(who: str, num_experts: int, world: int) -> int:
    """E_local = E / P, or a ValueError when the experts do not split evenly over the ranks."""
    if num_experts % world:
        raise ValueError(
            f"{who}: num_experts={num_experts} does not split evenly over the {world} ranks of the expert-parallel "
            f"group; every rank must hold the same number of experts (choose P dividing {num_experts})"
        )
    return num_experts // world


class ExpertParallelExperts(nn.Module):
    """This rank's E / P experts of a layer whose E experts are spread over the ranks of `group`; its
    `forward(x, routing)` is the whole layer's (all E experts) on this rank's tokens.

    Args:
        shard: the `Experts` slice this rank holds: experts [rank * E / P, (rank + 1) * E / P)
            (`Experts.shard`); its parameters become this module's (`gate_up_proj` or `up_proj`,
            `down_proj`, [E_local, ...]), so state dicts keep the names of `Experts`.
        group: the expert-parallel process group (None: the default group).

    Every rank of the group must call `forward` the same number of times, in the same order (the
    exchanges are collectives); a rank may route zero tokens.
    """

    expert_dims = None  # a shard cannot change its expert set alone (moekit.layers.surgery)

    def __init__(self, *, shard: Experts, group: Any = None) -> None:
        super().__init__()
        if not isinstance(shard, Experts):
            raise TypeError(f"ExpertParallelExperts: shard must be an Experts module, got {type(shard).__name__}")
        world, rank = group_size_rank(group)
        E = shard.num_experts
        local = check_divisible("ExpertParallelExperts", E, world)
        if shard.num_local_experts != local or shard.expert_offset != rank * local:
            raise ValueError(
                f"ExpertParallelExperts: rank {rank} of {world} must hold experts "
                f"[{rank * local}, {(rank + 1) * local}), the shard holds "
                f"[{shard.expert_offset}, {shard.expert_offset + shard.num_local_experts})"
            )
        self.group, self.world, self.rank = group, world, rank
        self.num_experts, self.dim, self.hidden = E, shard.dim, shard.hidden
        self.activation, self.gated, self.backend, self.act = shard.activation, shard.gated, shard.backend, shard.act
        self.expert_offset = shard.expert_offset
        for name, w in shard.named_parameters(recurse=False):
            setattr(self, name, w)

    @property
    def num_local_experts(self) -> int:
        """E_local = E / P, the experts this rank holds."""
        return self.down_proj.shape[0]

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the weights, which the input must have."""
        return self.down_proj.dtype

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D] this rank's tokens, routing over all E experts ([T, k]) -> [T, D] = sum over slots of
        weight * expert(x), the expert computed on the rank that owns it."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ExpertParallelExperts: expected input [T, {self.dim}], got {tuple(x.shape)}")
        if routing.expert_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"ExpertParallelExperts: routing covers {routing.expert_ids.shape[0]} tokens "
                f"but the input has {x.shape[0]}"
            )
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"ExpertParallelExperts: routing is over {routing.num_experts} experts "
                f"but the layer has {self.num_experts}"
            )
        check_input_dtype("ExpertParallelExperts", x, self.weight_dtype)
        P, El = self.world, self.num_local_experts
        p = plan(routing.expert_ids, self.num_experts)  # every expert's slots, sorted by expert (so by rank)
        xs = gather(x.contiguous(), p)  # [N, D]
        counts = torch.tensor(p.counts, dtype=torch.long)  # [E] slots per expert, on the host
        send = counts.view(P, El).sum(dim=1).tolist()  # [P] rows to each rank
        got = exchange_counts(counts.to(x.device), self.group).cpu()  # [P * El]: from rank r, for local expert e
        recv = got.view(P, El).sum(dim=1).tolist()  # [P] rows from each rank
        xr = all_to_all(xs, recv, send, self.group)  # [N_recv, D], by source rank, then local expert
        local_ids = torch.arange(self.expert_offset, self.expert_offset + El).repeat(P)  # [P * El]
        ids = local_ids.repeat_interleave(got).view(-1, 1).to(x.device)  # [N_recv, 1] global expert ids
        rp = plan(ids, self.num_experts, offset=self.expert_offset, num_local=El)
        ones = xr.new_ones(ids.shape)  # [N_recv, 1]: each received row is one weight-1 slot
        yr = get_backend(self.backend)(xr, rp, ones, self)  # [N_recv, D] expert(row), in received order
        ys = all_to_all(yr, send, recv, self.group)  # [N, D] back, in the order of xs
        return combine(ys, p, routing.weights, x.shape[0])

    def extra_repr(self) -> str:
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        return f"num_experts={self.num_experts}, experts=[{lo}, {hi}), ranks={self.world}, backend={self.backend!r}"


class ExpertParallelMoE(MoE):
    """An `MoE` layer whose experts are an `ExpertParallelExperts` shard: it routes this rank's tokens
    with its (replicated) routers inside `batch_scope(group)`, so balance losses and DeepSeek's
    selection-bias loads are taken over the batch all ranks of the group hold. Same arguments as `MoE`
    plus `group`; build one from a one-process layer with `shard_moe`. State dict names are `MoE`'s."""

    def __init__(self, *, group: Any = None, **moe_args: Any) -> None:
        super().__init__(**moe_args)
        if not isinstance(self.experts, ExpertParallelExperts):
            raise TypeError("ExpertParallelMoE: experts must be ExpertParallelExperts (use shard_moe)")
        check_routers(self, "ExpertParallelMoE")
        self.group = group

    def forward(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, Routing]:  # type: ignore[override]
        """As `MoE.forward`, on this rank's tokens; every rank of the group must call it together."""
        with batch_scope(self.group):
            return super().forward(x, **kwargs)

    def config(self) -> dict[str, Any]:
        raise TypeError("ExpertParallelMoE.config: a rank holds a shard; save the gathered one-process layer")


def check_routers(moe: MoE, who: str) -> None:
    """Raise ValueError unless the layer routes each token independently of the rest of the batch
    (`token_local` routers, no layer capacity): only then does a batch split over ranks route as one batch."""
    for r in moe.routers:
        if not getattr(r, "token_local", False):
            raise ValueError(
                f"{who}: router {type(r).__name__} is not token_local: a token's routing depends on the other "
                "tokens of the batch (expert choice, capacity limits) or its batch statistics are not reduced "
                "over ranks, so splitting the batch over ranks would change its decisions"
            )
    if moe.capacity_factor is not None:
        raise ValueError(
            f"{who}: capacity_factor={moe.capacity_factor} drops slots by a per-batch capacity; expert parallelism "
            "here is dropless (use capacity_factor=None)"
        )


def shard_moe(moe: MoE, group: Any = None) -> ExpertParallelMoE:
    """The expert-parallel version of a one-process `MoE` for this rank of `group` (None: the default
    group): routers, shared experts and gate copied, experts [rank * E / P, (rank + 1) * E / P) sliced
    from `moe.experts` (same weights). Every rank must pass the same layer (same seed or a loaded
    checkpoint). Raises ValueError when E % P != 0 or the routers are not `token_local`."""
    if type(moe) is not MoE:
        raise TypeError(f"shard_moe: expected a one-process MoE, got {type(moe).__name__}")
    experts = moe.experts
    if not isinstance(experts, Experts) or experts.sharded:
        raise TypeError("shard_moe: the layer's experts must be a whole Experts module (all E experts)")
    check_routers(moe, "shard_moe")
    world, rank = group_size_rank(group)
    local = check_divisible("shard_moe", experts.num_experts, world)
    ep = ExpertParallelExperts(shard=experts.shard(rank * local, local), group=group)
    routers = [copy.deepcopy(r) for r in moe.routers]
    new = ExpertParallelMoE(
        group=group,
        router=routers[0] if "router" in moe._modules else routers,
        experts=ep,
        shared_experts=copy.deepcopy(moe.shared_experts),
        shared_gate=moe.shared_expert_gate is not None,
        capacity_factor=None,
        capacity_priority=moe.capacity_priority,
        inner_residual=moe.inner_residual,
    )
    if moe.shared_expert_gate is not None:
        new.shared_expert_gate.load_state_dict(moe.shared_expert_gate.state_dict())
    return new.to(experts.down_proj.device)


__all__ = ["ExpertParallelExperts", "ExpertParallelMoE", "check_routers", "shard_moe"]
