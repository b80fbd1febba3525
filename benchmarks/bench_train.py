"""Training throughput: moekit's LM against the same architecture built as a Hugging Face transformers
Qwen3-MoE model from config (moekit's LM with qk_norm="head" and its exact Qwen3-MoE config; its
`grouped_mm` and `eager` experts implementations), same batch,
AdamW steps, in one process.

    python benchmarks/bench_train.py                 # tiny-moe shapes, CPU fp32, 2 threads
    python benchmarks/bench_train.py --steps 12 --batch-size 16 --seq-len 128
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --threads 0   # on a GPU (bf16 autocast)

`--device` / `--dtype` / `--bf16-on-cpu` are moekit train's (bfloat16 autocasts the forward passes; refused
on CPU unless --bf16-on-cpu). Both models compute a load-balancing auxiliary loss (HF:
output_router_logits=True). Prints
tokens/s and the ratio moekit / HF best; writes JSON and markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.models import MoELM  # noqa: E402
from moekit.models.presets import preset  # noqa: E402
from moekit.train.device import autocast, resolve_device  # noqa: E402


def hf_qwen3_moe(cfg, impl: str):
    """The transformers Qwen3-MoE equivalent of moekit's config (moekit.hf's exact mapping)."""
    from transformers import Qwen3MoeForCausalLM

    from moekit.hf import hf_config_for

    hc = hf_config_for(cfg, "qwen3_moe")
    hc.output_router_logits = True  # its load-balancing loss, as moekit computes one
    hc.router_aux_loss_coef = 0.01
    hc._experts_implementation = impl
    hc._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(hc)


def step_fn(model, opt, x, y, is_moekit: bool, device: torch.device, dtype: str):
    def step():
        with autocast(device, dtype):  # forward under bf16 autocast when asked, as moekit train does
            if is_moekit:
                out = model(x, targets=y)
                loss = out.loss + out.aux_loss
            else:
                loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside; includes the aux loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the step, not its launch

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (TrainConfig.device)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="forward compute dtype")
    ap.add_argument("--bf16-on-cpu", action="store_true", help="allow --dtype bfloat16 on CPU (much slower)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/bench_train_<device>_<dtype>.json")
    args = ap.parse_args()
    try:  # a device this machine lacks is one line, before any model is built
        where = resolve_device(args.device, args.dtype, bf16_on_cpu=args.bf16_on_cpu)
    except ValueError as exc:
        ap.exit(1, f"error: {exc}\n")
    args.out = args.out or f"benchmarks/results/bench_train_{where.type}_{args.dtype}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset, max_seq_len=args.seq_len, qk_norm="head")  # Qwen3's per-head q/k norms, in both
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len)).to(where)
    y = torch.roll(x, -1, dims=1)
    models = {"moekit": MoELM(cfg)}
    for impl in ("grouped_mm", "eager"):
        models[f"hf_qwen3_moe_{impl}"] = hf_qwen3_moe(cfg, impl)
    steps = {}
    for name, m in models.items():
        m.to(where).train()  # weights and optimiser state stay float32; autocast picks the compute dtype
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        steps[name] = step_fn(m, opt, x, y, name == "moekit", where, args.dtype)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times = {n: [] for n in steps}
    for _ in range(args.steps):
        for n, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    tps = {n: tokens / statistics.median(ts) for n, ts in times.items()}
    hf_best = max((n for n in tps if n.startswith("hf_")), key=tps.get)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print(f"{'model':26s} {'params':>10s} {'tokens/s':>10s} {'vs HF best':>10s}")
    for n, v in sorted(tps.items(), key=lambda kv: -kv[1]):
        print(f"{n:26s} {params[n]:10,d} {v:10.0f} {v / tps[hf_best]:10.2f}")
    env = environment()
    payload = {
        "benchmark": "bench_train",
        "env": env,
        "preset": args.preset,
        "device": str(where),
        "dtype": args.dtype,
        "config": cfg.to_dict(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_s": tps,
        "params": params,
        "hf_best": hf_best,
        "moekit_over_hf_best": tps["moekit"] / tps[hf_best],
    }
    write_json(args.out, payload)
    md = [
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch "
        f"{env['torch']}, transformers {env.get('transformers')}, threads {env['torch_threads']}; "
        f"trained on {where} in {args.dtype}; {env['date']}",
        "",
        "| model | params | tokens/s | vs HF best |",
        "|---|---:|---:|---:|",
    ]
    md += [
        f"| {n} | {params[n]:,} | {v:.0f} | {v / tps[hf_best]:.2f} |"
        for n, v in sorted(tps.items(), key=lambda kv: -kv[1])
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"moekit / HF best ({hf_best}) = {tps['moekit'] / tps[hf_best]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
