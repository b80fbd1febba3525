"""A launch check for expert parallelism: under torchrun, every rank builds the same MoE layer, runs
its slice of one batch through the expert-parallel layer and the whole batch through the one-process
layer, and rank 0 prints the largest differences (outputs, input gradients, summed router gradients),
relative to max(1, the largest value).

    torchrun --nproc_per_node 2 -m moekit.distributed.check              # gloo on CPU
    torchrun --nproc_per_node 8 -m moekit.distributed.check --backend nccl --experts 64
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from moekit.distributed.ep import shard_moe
from moekit.layers import Experts, MoE
from moekit.routing.registry import build_router


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the check in this process (one rank of a torchrun launch); returns the differences."""
    ap = argparse.ArgumentParser(description="expert parallelism against one process, under torchrun")
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--router", default="topk")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=32)
    args = ap.parse_args(argv)
    dist.init_process_group(args.backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cpu")
        if args.backend == "nccl":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        torch.manual_seed(0)
        router = build_router(args.router, dim=args.dim, num_experts=args.experts)
        experts = Experts(num_experts=args.experts, dim=args.dim, hidden=2 * args.dim)
        full = MoE(router=router, experts=experts).to(device)
        ep = shard_moe(full)
        x_all = torch.randn(world * args.tokens, args.dim, device=device, generator=None)
        dist.broadcast(x_all, 0)
        x = x_all.clone().requires_grad_(True)
        y, r = full(x)
        (y.square().sum() + r.total_aux()).backward()
        lo = rank * args.tokens
        xl = x_all[lo : lo + args.tokens].clone().requires_grad_(True)
        yl, rl = ep(xl)
        (yl.square().sum() + rl.total_aux()).backward()
        g = ep.router.weight.grad.clone()
        dist.all_reduce(g)

        def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # max |a - b| / max(1, max |b|)
            return (a - b).abs().max() / b.abs().max().clamp_min(1.0)

        diffs = torch.stack([
            rel(yl, y[lo : lo + args.tokens]),
            rel(xl.grad, x.grad[lo : lo + args.tokens]),
            rel(g, full.router.weight.grad),
        ])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        out = dict(zip(("output", "input_grad", "router_grad"), diffs.tolist(), strict=True))
        if rank == 0:
            print(f"expert parallel over {world} ranks ({args.backend}), E={args.experts}, {args.router}: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in out.items()) + " (max |diff| / max(1, max |value|))")
        return out
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
