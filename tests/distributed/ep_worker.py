"""Worker of the expert-parallel tests: one spawned gloo process per rank. Every rank builds the same
one-process layer (same seed), runs it on the whole batch (the reference), shards it with `shard_moe`,
runs its slice of the batch, and writes the largest differences per case to `<out>/rank<r>.json`."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from moekit.distributed import shard_moe
from moekit.layers import Experts, MoE
from moekit.routing.registry import build_router

D, F = 16, 8

CASES: dict[str, dict[str, Any]] = {
    "topk": dict(router="topk", args=dict(k=2, load_balance=0.1, z_loss=0.01), E=8),
    "topk_seq": dict(router="topk", args=dict(k=2, seq_balance=0.1, selection_bias=True), E=8, seq=True),
    "deepseek": dict(
        router="deepseek", E=8,
        args=dict(k=3, n_group=2, topk_group=1, bias_update_rate=0.01, load_balance=0.1, seq_balance=0.05, z_loss=0.01),
        seq=True,
    ),
    "null_experts": dict(router="null_experts", args=dict(k=2, num_null=2, load_balance=0.1, z_loss=0.01), E=8),
    "shared": dict(router="topk", args=dict(k=2), E=8, shared=True),
    "empty_input": dict(router="topk", args=dict(k=2, load_balance=0.1), E=8, empty_rank=0),
    "idle_experts": dict(router="topk", args=dict(k=2, load_balance=0.1), E=8, idle_last=True),
}


def build(case: dict[str, Any]) -> MoE:
    torch.manual_seed(0)
    E = case["E"]
    router = build_router(case["router"], dim=D, num_experts=E, **case["args"])
    shared = None
    if case.get("shared"):
        from moekit.layers import MLP

        shared = MLP(dim=D, hidden=F)
    moe = MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=F), shared_experts=shared,
              shared_gate=bool(case.get("shared")))
    if case.get("idle_last"):  # x >= 0 and the last rank's experts' gate rows < 0: they never win
        with torch.no_grad():
            router.weight.abs_()
            router.weight[E - E // dist.get_world_size():] *= -1
    return moe


def run_case(name: str, case: dict[str, Any], world: int, rank: int) -> dict[str, float]:
    full = build(case)
    full.train()
    seq = 4
    sizes = [3 * seq] * world  # tokens per rank (whole sequences of 4)
    if "empty_rank" in case:
        sizes[case["empty_rank"]] = 0
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(sum(sizes), D, generator=g)
    if case.get("idle_last"):
        x_all = x_all.abs()
    w_all = torch.randn(sum(sizes), D, generator=g)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    def shape(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, seq, D) if case.get("seq") else x

    ep = shard_moe(full, None)  # before the reference runs: the same weights and selection bias
    ref = copy.deepcopy(full)
    x = x_all.clone().requires_grad_(True)
    y, r = ref(shape(x))
    ref_aux = r.total_aux()
    ((y.reshape(-1, D) * w_all).sum() + ref_aux).backward()

    xl = x_all[lo:hi].clone().requires_grad_(True)
    yl, rl = ep(shape(xl))
    aux = rl.total_aux()
    ((yl.reshape(-1, D) * w_all[lo:hi]).sum() + aux).backward()
    # replicated parameters (routers, shared experts): their gradient is the sum over ranks
    expert_names = {n for n, _ in ep.experts.named_parameters()}
    for n, p in ep.named_parameters():
        if not n.startswith("experts.") and p.grad is not None:
            dist.all_reduce(p.grad)
    aux_sum = aux.detach().clone()
    dist.all_reduce(aux_sum)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        """max |a - b| / max(1, max |b|): fp32 sums in another order differ in the last bits, relative to
        the values' magnitude (expert gradients sum over every rank's tokens)."""
        if a.shape != b.shape:
            return float("inf")
        if not a.numel():
            return 0.0
        return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))

    ref_params = dict(ref.named_parameters())
    out = {
        "y": diff(yl.reshape(-1, D).detach(), y.reshape(-1, D)[lo:hi].detach()),
        "x_grad": diff(xl.grad, x.grad[lo:hi]),
        "aux": diff(aux_sum, ref_aux.detach()),
        "aux_ref": float(ref_aux.detach()),
        "tokens": float(hi - lo),
    }
    El = case["E"] // world
    for n, p in ep.named_parameters():
        want = ref_params[n].grad
        if n.startswith("experts.") and n[len("experts."):] in expert_names:
            want = want[rank * El : (rank + 1) * El]
        out[f"grad:{n}"] = diff(p.grad, want)
    for n, b in ep.named_buffers():
        out[f"buffer:{n}"] = diff(b, dict(ref.named_buffers())[n])
    counts = torch.bincount(rl.expert_ids.reshape(-1).clamp_min(0), minlength=case["E"])
    out["received_by_last_rank"] = float(_all_sum(counts)[case["E"] - El :].sum())
    return out


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def errors(world: int) -> dict[str, str]:
    """Messages of the refusals: E % P != 0, expert choice, layer capacity."""
    msgs = {}

    def layer(router: str, E: int, **kwargs: Any) -> MoE:
        return MoE(router=build_router(router, dim=D, num_experts=E), experts=Experts(num_experts=E, dim=D, hidden=F),
                   **kwargs)

    cases = {"uneven": ("topk", 6, {}), "expert_choice": ("expert_choice", 8, {}),
             "capacity": ("topk", 8, {"capacity_factor": 1.0})}
    for name, (router, E, kwargs) in cases.items():
        try:
            shard_moe(layer(router, E, **kwargs), None)
            msgs[name] = ""
        except ValueError as e:
            msgs[name] = str(e)
    return msgs


def worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        results = {name: run_case(name, case, world, rank) for name, case in CASES.items()}
        results["errors"] = errors(world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
