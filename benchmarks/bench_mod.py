"""Mixture-of-Depths against its baseline: the leaderboard's `mixture_of_depths` and `topk` models
(same top-2 MoE blocks; MoD lets 12.5% of the tokens into blocks 1 and 3), trained on the `small`
budget, timed in one process on the same inputs:

- a full-sequence forward (evaluation; MoD's causal per-token decisions), 16 x 128 validation tokens;
- KV-cached greedy generation (what the paper says MoD speeds up, "upwards of 50% faster to step
  during post-training sampling"), 8 prompts of 16 tokens + 112 new tokens;
- one training step (forward + backward + AdamW; MoD's top-k selection), 16 x 128 tokens.

    python benchmarks/bench_mod.py                                   # trains both if needed (~3 min)
    python benchmarks/bench_mod.py --runs runs/leaderboard-small     # reuse the leaderboard's runs

Prints milliseconds, the MoD / baseline speed ratios and the share of tokens the routed blocks took;
writes JSON and markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_medians, write_json  # noqa: E402

from moekit.bench import BUDGETS, run_leaderboard  # noqa: E402
from moekit.data import DataConfig, prepare_data  # noqa: E402
from moekit.train.checkpoint import load_model  # noqa: E402
from moekit.train.run import val_windows  # noqa: E402

NAMES = ("topk", "mixture_of_depths")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/leaderboard-small", help="leaderboard output folder (runs reused)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/bench_mod.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run_leaderboard("small", list(NAMES), args.runs, progress=False, log=print)  # trains only what is missing
    models = {name: load_model(Path(args.runs) / "runs" / name).eval() for name in NAMES}
    b = BUDGETS["small"]  # the leaderboard's validation text: MoD's decisions depend on what it reads
    data = prepare_data(DataConfig(vocab_size=b.vocab_size, max_chars_per_domain=b.max_chars_per_domain, seed=0),
                        progress=False)
    text = torch.cat([x for x, _ in val_windows(data, b.seq_len, b.eval_windows).values()])  # [3 x 16, 128]
    ids = text[torch.randperm(len(text), generator=torch.Generator().manual_seed(0))[:16]]
    prompt = ids[:8, :16]

    with torch.inference_mode():
        shares = [float(d.float().mean()) for d in models["mixture_of_depths"](ids).depth if d is not None]
        forward = interleaved_medians({n: (lambda m=m: m(ids)) for n, m in models.items()}, args.repeats, 1, "cpu")
        decode = interleaved_medians(
            {n: (lambda m=m: m.generate(prompt, 112)) for n, m in models.items()}, args.repeats, 1, "cpu"
        )
    train_ms = {}
    for name, m in models.items():  # training step on a copy: the checkpoints stay as they are
        m = load_model(Path(args.runs) / "runs" / name).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt):
            out = m(ids, targets=ids)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train_ms[name] = interleaved_medians({name: step}, args.repeats, 1, "cpu")[name]
    result = {
        "environment": environment(),
        "processed_share_eval": shares,
        "forward_ms": forward,
        "decode_ms": decode,
        "train_step_ms": train_ms,
        "speedup": {
            "forward": forward["topk"] / forward["mixture_of_depths"],
            "decode": decode["topk"] / decode["mixture_of_depths"],
            "train_step": train_ms["topk"] / train_ms["mixture_of_depths"],
        },
    }
    for k, v in result.items():
        if k != "environment":
            print(f"{k}: {v}")
    write_json(args.out, result)
    md = Path(args.out).with_suffix(".md")
    s = result["speedup"]
    md.write_text(
        "# Mixture-of-Depths vs its top-2 baseline\n\n"
        f"Command: `{result['environment']['command']}`; torch {result['environment']['torch']}, "
        f"{result['environment']['cpu_count']} CPUs, {args.threads} threads, {result['environment']['date']}.\n\n"
        f"Share of tokens the routed blocks processed (evaluation, causal decisions): "
        f"{', '.join(f'{x:.3f}' for x in shares)}\n\n"
        "| | topk (ms) | mixture_of_depths (ms) | MoD speed-up |\n|---|---:|---:|---:|\n"
        f"| forward, 16x128 | {forward['topk']:.1f} | {forward['mixture_of_depths']:.1f} | {s['forward']:.2f}x |\n"
        f"| greedy generation, 8 x (16 + 112) | {decode['topk']:.1f} | {decode['mixture_of_depths']:.1f} | "
        f"{s['decode']:.2f}x |\n"
        f"| training step, 16x128 | {train_ms['topk']:.1f} | {train_ms['mixture_of_depths']:.1f} | "
        f"{s['train_step']:.2f}x |\n"
    )


if __name__ == "__main__":
    main()
