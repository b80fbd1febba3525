"""Quantized experts (moekit.compress.quant) against the fp32 model: expert memory, logits error and forward
tokens/s of `tiny-moe` with random weights (CPU), int8 and int4 with group-wise scales, in one process.

    python benchmarks/quantize.py                  # group 128, batch 4 x 128 tokens, 2 threads
    python benchmarks/quantize.py --group-size 64 --repeats 9

Prints a table of ratios to fp32; writes JSON and a markdown table (see --out). Random weights measure memory,
speed and the numerical error of the format, not the loss of a trained model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_medians, write_json  # noqa: E402

from moekit.compress.quant import experts_nbytes, quantize_experts  # noqa: E402
from moekit.models import LMConfig, MoELM  # noqa: E402
from moekit.models.presets import PRESETS  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/quantize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LMConfig(**PRESETS[args.preset])
    models = {"fp32": MoELM(cfg).eval()}
    for bits in (8, 4):
        models[f"int{bits}"] = quantize_experts(copy.deepcopy(models["fp32"]), bits, args.group_size)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {name: m(ids).logits for name, m in models.items()}

        def run(m):
            return lambda: m(ids)

        ms = interleaved_medians({n: run(m) for n, m in models.items()}, args.repeats, 1, "cpu")
    ref = logits["fp32"]
    tokens = args.batch * args.seq
    rows = {}
    for name, m in models.items():
        diff = logits[name] - ref
        rows[name] = {
            "expert_bytes": experts_nbytes(m),
            "memory_ratio": experts_nbytes(m) / experts_nbytes(models["fp32"]),
            "logits_rel_l2": (diff.norm() / ref.norm()).item(),
            "logits_max_abs": diff.abs().max().item(),
            "argmax_agreement": (logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "ms": ms[name],
            "tokens_per_s": tokens / ms[name] * 1e3,
            "speed_ratio": ms["fp32"] / ms[name],
        }
    env = environment()
    head = (
        "| | expert bytes | memory vs fp32 | logits rel. L2 error | max abs error | same argmax | ms | tokens/s "
        "| speed vs fp32 |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['expert_bytes']:,} | {r['memory_ratio']:.3f} | {r['logits_rel_l2']:.2e} | "
            f"{r['logits_max_abs']:.2e} | {r['argmax_agreement']:.3f} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['speed_ratio']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    setup = dict(preset=args.preset, group_size=args.group_size, batch=args.batch, seq=args.seq,
                 repeats=args.repeats, threads=args.threads)
    write_json(f"{args.out}.json", {"environment": env, "setup": setup, "results": rows})
    import compressed_tensors

    md = (
        f"# Quantized experts vs fp32 (`{args.preset}`, random weights)\n\n"
        f"Command: `{env['command']}`; torch {env['torch']}, compressed-tensors {compressed_tensors.__version__}, "
        f"{env['processor']}, {env['cpu_count']} CPUs, {args.threads} threads, {env['date']}.\n"
        f"Group size {args.group_size}, forward of {args.batch} x {args.seq} tokens, median of {args.repeats}.\n\n"
        f"{table}\n"
    )
    atomic_write_text(f"{args.out}.md", md)


if __name__ == "__main__":
    main()
