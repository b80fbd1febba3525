"""Routing analysis costs.

1. Trace capture overhead: forward passes of moekit's `tiny-moe` LM over the same batches with and
   without the tracing hooks (and with expert outputs recorded, for super experts). Target: <= 1.10x.
2. Metric time: every metric of `moekit.analyze` (no plots) over a synthetic trace of 1M tokens and
   16 layers (E=16, k=2: 32M rows) with some locality. Target: < 60 s on 2 cores.

    python benchmarks/bench_analyze.py                   # both parts
    python benchmarks/bench_analyze.py --tokens 200000   # smaller synthetic trace
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.analyze.report import compute_metrics  # noqa: E402
from moekit.analyze.table import Trace  # noqa: E402
from moekit.analyze.trace import capture  # noqa: E402
from moekit.models import MoELM  # noqa: E402
from moekit.models.presets import preset  # noqa: E402


def capture_overhead(batches: int, batch_size: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MoELM(preset("tiny-moe", max_seq_len=seq_len)).eval()
    data = [torch.randint(0, 4096, (batch_size, seq_len)) for _ in range(batches)]
    labelled = [(x, {"label": ["a"] * batch_size}) for x in data]

    def plain():
        with torch.inference_mode():
            for x in data:
                model(x)

    def traced(outputs: bool):
        def run():
            with tempfile.TemporaryDirectory() as tmp:
                capture(model, labelled, Path(tmp) / "t.parquet", progress=False, record_outputs=outputs)

        return run

    fns = {"forward": plain, "forward+trace": traced(False), "forward+trace+outputs": traced(True)}
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "seconds": med,
        "tokens": batches * batch_size * seq_len,
        "overhead_trace": med["forward+trace"] / med["forward"],
        "overhead_trace_outputs": med["forward+trace+outputs"] / med["forward"],
    }


def synthetic_trace(path: Path, tokens: int, layers: int, E: int, k: int, seq_len: int, seed: int = 0) -> None:
    """Markov routing: each token keeps its predecessor's first expert with probability 0.6."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    n_seq = -(-tokens // seq_len)
    labels = np.array(["wiki", "bible", "code"])[np.arange(n_seq) % 3]
    for layer in range(layers):
        first = rng.integers(0, E, tokens)
        keep = rng.random(tokens) < 0.6
        idx = np.arange(tokens)
        last_new = np.maximum.accumulate(np.where(keep, 0, idx))  # a kept token copies the last fresh draw
        first = first[last_new]
        second = (first + 1 + rng.integers(0, E - 1, tokens)) % E
        ex = np.stack([first, second], axis=1)[:, :k].reshape(-1)
        seq = np.repeat(np.arange(tokens) // seq_len, k)
        table = pa.table(
            {
                "layer": pa.array(np.full(tokens * k, layer, np.int16)),
                "seq": pa.array(seq.astype(np.int32)),
                "pos": pa.array(np.repeat(np.arange(tokens) % seq_len, k).astype(np.int32)),
                "token": pa.array(np.repeat(rng.integers(0, 4096, tokens), k).astype(np.int32)),
                "slot": pa.array(np.tile(np.arange(k), tokens).astype(np.int8)),
                "expert": pa.array(ex.astype(np.int16)),
                "weight": pa.array(rng.random(tokens * k).astype(np.float32)),
                "p_top1": pa.array(np.repeat(rng.random(tokens), k).astype(np.float32)),
                "entropy": pa.array(np.repeat(rng.random(tokens), k).astype(np.float32)),
                "out_absmax": pa.array(rng.random(tokens * k).astype(np.float32)),
                "label": pa.array(np.repeat(labels[np.arange(tokens) // seq_len], k)).dictionary_encode(),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(str(path), table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--capture-batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-capture", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/bench_analyze.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "bench_analyze", "env": environment()}
    if not args.skip_capture:
        cap = capture_overhead(args.capture_batches, 16, 128, args.repeats)
        result["capture"] = cap
        print(
            f"capture: forward {cap['seconds']['forward']:.3f}s for {cap['tokens']} tokens; "
            f"with trace x{cap['overhead_trace']:.3f}; with expert outputs x{cap['overhead_trace_outputs']:.3f}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.parquet"
        t0 = time.perf_counter()
        synthetic_trace(path, args.tokens, args.layers, args.experts, 2, 256)
        gen = time.perf_counter() - t0
        import duckdb

        duckdb.execute(f"SET threads TO {args.threads}")
        t0 = time.perf_counter()
        trace = Trace(path)
        trace.con.execute(f"SET threads TO {args.threads}")
        metrics = compute_metrics(trace)
        secs = time.perf_counter() - t0
    rows = args.tokens * args.layers * 2
    result["metrics"] = {
        "tokens": args.tokens,
        "layers": args.layers,
        "experts": args.experts,
        "k": 2,
        "rows": rows,
        "seconds": secs,
        "generate_seconds": gen,
        "layer0_srp16": metrics["locality"][0]["srp"][16],
    }
    print(f"metrics over {args.tokens:,} tokens x {args.layers} layers ({rows:,} rows): {secs:.1f}s (target < 60 s)")
    write_json(args.out, result)
    env = result["env"]
    md = [
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}; {env['date']}",
        "",
    ]
    if "capture" in result:
        c = result["capture"]
        md += ["| capture | seconds | x forward |", "|---|---:|---:|"]
        md += [f"| {n} | {v:.3f} | {v / c['seconds']['forward']:.3f} |" for n, v in c["seconds"].items()]
        md.append("")
    md.append(f"Every metric over {args.tokens:,} tokens x {args.layers} layers ({rows:,} rows): {secs:.1f} s.")
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
