"""The classic MoE result at tiny scale: an MoE LM (E=8, k=2) and a dense LM with the same active
parameters, same data, steps and seed. Records both validation curves and the number of steps the
MoE needs to reach the dense model's final validation loss.

    python benchmarks/moe_vs_dense.py                     # 600 steps each, built-in corpus
    python benchmarks/moe_vs_dense.py --steps 100 --eval-every 20
    python benchmarks/moe_vs_dense.py --device cuda --dtype bfloat16 --threads 0   # on a GPU

Target (issue): the MoE reaches the dense model's final validation loss in <= 0.6x the steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.data import DataConfig, prepare_data  # noqa: E402
from moekit.models import count_params  # noqa: E402
from moekit.models.presets import preset  # noqa: E402
from moekit.train import TrainConfig, train  # noqa: E402
from moekit.train.device import resolve_device  # noqa: E402
from moekit.train.run import val_windows  # noqa: E402


def steps_to_reach(history: list[dict], target: float) -> float | None:
    """First step at which the validation loss is <= target, linearly interpolated between evals."""
    prev = None
    for row in history:
        if row["loss"] <= target:
            if prev is None or prev["loss"] == row["loss"]:
                return float(row["step"])
            frac = (prev["loss"] - target) / (prev["loss"] - row["loss"])
            return prev["step"] + frac * (row["step"] - prev["step"])
        prev = row
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (TrainConfig.device)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="forward compute dtype")
    ap.add_argument("--bf16-on-cpu", action="store_true", help="allow --dtype bfloat16 on CPU (much slower)")
    ap.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    args = ap.parse_args()
    try:  # a device this machine lacks is one line, before any data is built
        where = resolve_device(args.device, args.dtype, bf16_on_cpu=args.bf16_on_cpu)
    except ValueError as exc:
        ap.exit(1, f"error: {exc}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = DataConfig(vocab_size=4096, seed=args.seed)
    data = prepare_data(data_cfg, progress=False)
    windows = val_windows(data, args.seq_len, 32)
    tcfg = TrainConfig.short_run(
        args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_windows=32,
        log_every=10,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        bf16_on_cpu=args.bf16_on_cpu,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in (("dense", "tiny-dense"), ("moe", "tiny-moe")):
            mcfg = preset(p, vocab_size=data.vocab_size, max_seq_len=args.seq_len)
            res = train(mcfg, tcfg, data.train, windows, Path(tmp) / name, progress=True)
            results[name] = {
                "preset": p,
                "params": count_params(mcfg).as_dict(),
                "history": res.history,
                "final": res.history[-1],
                "train_log": res.train_log,
            }
            print(f"{name}: final validation loss {res.history[-1]['loss']:.4f}")
    target = results["dense"]["final"]["loss"]
    reach = steps_to_reach(results["moe"]["history"], target)
    ratio = reach / args.steps if reach is not None else None
    summary = {
        "dense_final_loss": target,
        "moe_final_loss": results["moe"]["final"]["loss"],
        "moe_steps_to_dense_final": reach,
        "ratio": ratio,
        "target_ratio": 0.6,
    }
    print(
        f"MoE reaches the dense final loss {target:.4f} at step {reach}: "
        f"{'never' if ratio is None else round(ratio, 3)} of the steps (target <= 0.6)"
    )
    env = environment()
    write_json(
        args.out,
        {"benchmark": "moe_vs_dense", "env": env, "train": tcfg.to_dict(), "summary": summary, "runs": results},
    )
    md = [
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}; trained on {where} in "
        f"{args.dtype}; {env['date']}",
        "",
        "| step | dense val loss | MoE val loss |",
        "|---:|---:|---:|",
    ]
    for d, m in zip(results["dense"]["history"], results["moe"]["history"], strict=True):
        md.append(f"| {d['step']} | {d['loss']:.4f} | {m['loss']:.4f} |")
    md += ["", f"MoE steps to reach the dense model's final loss: {reach} of {args.steps} (ratio {ratio})."]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
