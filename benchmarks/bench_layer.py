"""MoE layer speed: moekit (each dispatch backend and `auto`) against Hugging Face transformers'
OLMoE and Mixtral sparse MoE blocks (their `grouped_mm` and `eager` experts implementations) and a
dense SwiGLU of equal active FLOPs (width k*F), in one process on identical weights.

    python benchmarks/bench_layer.py                      # all shapes, CPU fp32, 2 threads
    python benchmarks/bench_layer.py --shapes a --repeats 5
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --threads 0

Prints median ms and ratios to dense and to Hugging Face's best; writes JSON (see --out).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_medians, write_json  # noqa: E402

from moekit.layers import MLP, Experts, MoE  # noqa: E402
from moekit.routing import build_router  # noqa: E402

SHAPES = {
    "a": dict(D=512, F=1024, E=8, k=2, T=2048),
    "b": dict(D=1024, F=512, E=64, k=8, T=2048),
}
BACKENDS = ("auto", "loop", "grouped", "eager")


def hf_blocks(D: int, F: int, E: int, k: int, device: str, dtype: torch.dtype) -> dict:
    """Hugging Face OLMoE and Mixtral sparse MoE blocks built from config, one per experts implementation."""
    from transformers import MixtralConfig, OlmoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    blocks = {}
    for impl in ("grouped_mm", "eager"):
        oc = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True)
        mc = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
        for cfg in (oc, mc):
            cfg._experts_implementation = impl
        blocks[f"hf_olmoe_{impl}"] = OlmoeSparseMoeBlock(oc)
        blocks[f"hf_mixtral_{impl}"] = MixtralSparseMoeBlock(mc)
    return {n: b.to(device=device, dtype=dtype) for n, b in blocks.items()}


def build(shape: dict, device: str, dtype: torch.dtype, with_hf: bool) -> dict[str, torch.nn.Module]:
    """moekit layers per backend, HF blocks and a dense SwiGLU; all MoE blocks share one set of weights."""
    D, F, E, k = shape["D"], shape["F"], shape["E"], shape["k"]
    torch.manual_seed(0)
    ref = MoE(
        router=build_router("topk", dim=D, num_experts=E, k=k, normalize=True, load_balance=0.0),
        experts=Experts(num_experts=E, dim=D, hidden=F),
    ).to(device=device, dtype=dtype)
    models: dict[str, torch.nn.Module] = {}
    for b in BACKENDS:
        m = copy.deepcopy(ref)
        m.experts.backend = b
        models[f"moekit_{b}"] = m
    if with_hf:
        for name, blk in hf_blocks(D, F, E, k, device, dtype).items():
            with torch.no_grad():
                blk.gate.weight.copy_(ref.router.weight)
                blk.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
                blk.experts.down_proj.copy_(ref.experts.down_proj)
            models[name] = blk
    models["dense"] = MLP(dim=D, hidden=k * F).to(device=device, dtype=dtype)
    return models


def runner(model: torch.nn.Module, x: torch.Tensor, backward: bool):
    """A closure that runs one forward (no grad) or forward+backward."""
    grad = torch.randn_like(x)
    is_moekit = isinstance(model, MoE)

    def fwd():
        out = model(x)
        return out[0] if is_moekit else out

    if not backward:

        def run():
            with torch.inference_mode():
                fwd()
    else:
        xg = x.detach().requires_grad_(True)

        def run():
            model.zero_grad(set_to_none=True)
            xg.grad = None
            out = model(xg)
            (out[0] if is_moekit else out).backward(grad)

    return run


def check_same(models: dict, x: torch.Tensor) -> float:
    """Largest difference between moekit_auto and the HF blocks on this input (sanity: same weights)."""
    with torch.no_grad():
        ours = models["moekit_auto"](x)[0]
        diffs = [float((ours - m(x)).abs().max()) for n, m in models.items() if n.startswith("hf_")]
    return max(diffs) if diffs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="a,b", help="comma list of a, b")
    ap.add_argument("--modes", default="train,forward,decode1,decode8", help="train,forward,decode1,decode8")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0 = leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face blocks")
    ap.add_argument("--skip", default="moekit_eager", help="comma list of candidates to skip (slow references)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_layer_DEVICE_DTYPE.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    skip = set(filter(None, args.skip.split(",")))
    results = []
    for s in args.shapes.split(","):
        shape = SHAPES[s]
        models = {n: m for n, m in build(shape, args.device, dtype, not args.no_hf).items() if n not in skip}
        for mode in args.modes.split(","):
            T = {"train": shape["T"], "forward": shape["T"], "decode1": 1, "decode8": 8}[mode]
            x = torch.randn(1, T, shape["D"], device=args.device, dtype=dtype)
            fns = {n: runner(m, x, backward=(mode == "train")) for n, m in models.items()}
            repeats = args.repeats if T > 8 else max(args.repeats, 50)
            ms = interleaved_medians(fns, repeats, args.warmup, args.device)
            hf = {n: v for n, v in ms.items() if n.startswith("hf_")}
            hf_best = min(hf.values()) if hf else None
            row = {
                "shape": s,
                **shape,
                "T": T,
                "mode": mode,
                "ms": ms,
                "ratio_to_dense": {n: v / ms["dense"] for n, v in ms.items()},
                "hf_best": min(hf, key=hf.get) if hf else None,
                "speedup_vs_hf_best": {n: hf_best / v for n, v in ms.items()} if hf else None,
                "max_abs_diff_vs_hf": check_same(models, x) if hf else None,
            }
            results.append(row)
            print(f"\nshape {s} {shape} mode={mode} T={T}")
            print(f"{'candidate':26s} {'ms':>10s} {'x dense':>9s} {'HF best/x':>10s}")
            for n, v in sorted(ms.items(), key=lambda kv: kv[1]):
                sp = f"{hf_best / v:10.2f}" if hf_best else ""
                print(f"{n:26s} {v:10.2f} {v / ms['dense']:9.2f} {sp}")
    out = args.out or f"benchmarks/results/bench_layer_{args.device}_{args.dtype}.json"
    env = environment()
    write_json(out, {"benchmark": "bench_layer", "env": env, "dtype": args.dtype, "results": results})
    md = Path(out).with_suffix(".md")
    md.write_text(markdown(results, env, args.dtype))
    print(f"\nwrote {out} and {md}")


def markdown(results: list[dict], env: dict, dtype: str) -> str:
    """A table per shape and mode: median ms, ratio to dense, speed-up over Hugging Face's best."""
    lines = [
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; "
        f"torch {env['torch']}, transformers {env.get('transformers', '-')}, {dtype}; {env['date']}",
        "",
    ]
    for row in results:
        lines += [
            f"**shape {row['shape']}** (D={row['D']}, F={row['F']}, E={row['E']}, k={row['k']}), "
            f"mode `{row['mode']}`, T={row['T']}",
            "",
            "| candidate | median ms | x dense | HF best / candidate |",
            "|---|---:|---:|---:|",
        ]
        for n, v in sorted(row["ms"].items(), key=lambda kv: kv[1]):
            sp = row["speedup_vs_hf_best"][n] if row["speedup_vs_hf_best"] else float("nan")
            lines.append(f"| {n} | {v:.2f} | {row['ratio_to_dense'][n]:.2f} | {sp:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
