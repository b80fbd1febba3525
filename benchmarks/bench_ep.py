"""Expert parallelism on gloo: 1, 2 and 4 processes on one machine, the total number of threads fixed
(threads per process = total / P), one MoE layer (topk k=2, dropless) forward + backward on a fixed
global batch split over the processes. Per P: median step time, tokens/s, and the bytes the all-to-alls
move between different ranks per step (rows sent off-rank x D x 4 bytes, forward there and back, and the
same again in the backward). P = 1 is the one-process `MoE` layer itself (the peer): ratios are to it.

    python benchmarks/bench_ep.py                    # E=8 and E=64, ~1 minute
    python benchmarks/bench_ep.py --experts 8 --steps 3 --threads 2

On a machine with fewer cores than the total threads, the processes share cores: the ratios then show
the exchange's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.distributed import shard_moe  # noqa: E402
from moekit.layers import Experts, MoE  # noqa: E402
from moekit.routing.registry import build_router  # noqa: E402

D, F, TOKENS = 128, 256, 2048


def layer(E: int) -> MoE:
    torch.manual_seed(0)
    return MoE(router=build_router("topk", dim=D, num_experts=E, k=2), experts=Experts(num_experts=E, dim=D, hidden=F))


def worker(rank: int, world: int, E: int, steps: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{out}/rdv{E}_{world}", rank=rank, world_size=world)
    try:
        moe = shard_moe(layer(E)) if world > 1 else layer(E)
        x_all = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))
        n = TOKENS // world
        x = x_all[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        times, remote = [], 0
        for step in range(steps + 1):  # the first step warms up
            dist.barrier()
            t0 = time.perf_counter()
            y, routing = moe(x)
            y.square().mean().backward()
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
        counts = routing.tokens_per_expert().view(world, E // world).sum(dim=1)  # rows to each rank
        remote = int(counts.sum() - counts[rank])
        total = torch.tensor([remote], dtype=torch.long)
        dist.all_reduce(total)
        if rank == 0:
            result = {"step_s": statistics.median(times), "offrank_rows": int(total),
                      "alltoall_bytes": int(total) * D * 4 * 4}
            Path(out, f"r{E}_{world}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=4, help="total threads, split over the processes")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/bench_ep.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for E in args.experts:
            for P in args.procs:
                threads = max(1, args.threads // P)
                mp.start_processes(worker, args=(P, E, args.steps, threads, out), nprocs=P, join=True,
                                   start_method="spawn")
                r = json.loads(Path(out, f"r{E}_{P}.json").read_text())
                rows.append({"experts": E, "procs": P, "threads_per_proc": threads, **r,
                             "tokens_per_s": TOKENS / r["step_s"]})
    base = {r["experts"]: r["step_s"] for r in rows if r["procs"] == 1}
    print(f"{'E':>4} {'P':>2} {'thr':>3} {'step ms':>8} {'tok/s':>8} {'vs P=1':>7} {'off-rank MB':>11}")
    for r in rows:
        r["time_vs_p1"] = r["step_s"] / base[r["experts"]] if r["experts"] in base else None
        ratio = f"{r['time_vs_p1']:.2f}x" if r["time_vs_p1"] else "-"
        print(f"{r['experts']:>4} {r['procs']:>2} {r['threads_per_proc']:>3} {1e3 * r['step_s']:>8.1f} "
              f"{r['tokens_per_s']:>8.0f} {ratio:>7} {r['alltoall_bytes'] / 1e6:>11.2f}")
    write_json(args.json, {"environment": environment(), "layer": {"dim": D, "hidden": F, "tokens": TOKENS, "k": 2},
                           "results": rows})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
