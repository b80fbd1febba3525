"""Training after compression, briefly: a 25%-pruned MoE fine-tuned N steps with distillation from the unpruned
model (plain KD, and KD with Every Expert Matters knowledge augmentation) against the pruned model alone and against
N steps of plain cross-entropy fine-tuning (the control: distillation must beat training, not only no training);
and ternary QAT for N steps against post-training ternary quantization.

    python benchmarks/compress_distill.py --run RUN --steps 40 --seeds 0,1 --out benchmarks/results/compress_distill

RUN is any trained moekit run folder (its data config must be prepared or preparable offline). Per row: validation
loss overall (the run's validation windows) and KL(teacher || student) on the first validation windows; rows that
train report the mean and spread (std) over the seeds (data order and sampled routing).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.compress.distill import DistillConfig, distill_run, kd_loss  # noqa: E402
from moekit.compress.finetune import FinetuneConfig, finetune_run  # noqa: E402
from moekit.compress.qat import post_training_quantize, qat_run  # noqa: E402
from moekit.compress.run import compress_run, validation_losses  # noqa: E402
from moekit.data import DataConfig, prepare_data  # noqa: E402
from moekit.train.checkpoint import load_model, read_meta  # noqa: E402
from moekit.train.evaluate import validation_windows  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402


@torch.no_grad()
def kl_to(teacher: torch.nn.Module, model: torch.nn.Module, windows: dict, per_label: int = 4) -> float:
    """Mean KL(teacher || model) (temperature 1) over the first `per_label` validation windows of each label."""
    vals = []
    for x, _ in windows.values():
        x = x[:per_label]
        vals.append(kd_loss(model.eval()(x).logits, teacher.eval()(x).logits).item())
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained moekit MoE run folder (the teacher)")
    ap.add_argument("--method", default="frequency", help="pruning method for the student")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=2, help="knowledge augmentation: sampled teacher passes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/compress_distill")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    meta = read_meta(args.run)
    data = prepare_data(DataConfig(**meta["data"]), progress=False)
    windows = validation_windows(data, meta["train"]["seq_len"], meta["train"]["eval_windows"])
    bs = meta["train"]["batch_size"]
    teacher = load_model(args.run).eval()
    rows = []

    def row(name: str, losses: list[float], kls: list[float]) -> None:
        spread = statistics.pstdev(losses) if len(losses) > 1 else 0.0
        rows.append({"setting": name, "loss": statistics.mean(losses), "spread": spread, "kl": statistics.mean(kls),
                     "n": len(losses)})
        print(f"{name:45s} loss {rows[-1]['loss']:.4f} +- {spread:.4f}  KL {rows[-1]['kl']:.4f}", flush=True)

    row("teacher (unpruned)", [validation_losses(teacher, windows, bs)["all"]], [0.0])
    tmp = Path(tempfile.mkdtemp(prefix="compress-distill-"))
    try:
        pruned = tmp / "pruned"
        compress_run(args.method, args.run, pruned, ratio=args.ratio, evaluate=False)
        p_model = load_model(pruned)
        row(f"{args.method} {args.ratio:.0%} pruned, no training", [validation_losses(p_model, windows, bs)["all"]],
            [kl_to(teacher, p_model, windows)])
        settings = {
            "+ cross-entropy fine-tuning": None,
            "+ KD (tau 2, alpha 1)": DistillConfig(alpha=1.0, temperature=2.0),
            f"+ KD with knowledge augmentation (M={args.samples})": DistillConfig(alpha=1.0, temperature=2.0,
                                                                                   samples=args.samples),
        }
        for name, cfg in settings.items():
            losses, kls = [], []
            for seed in seeds:
                ft = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                    seed=seed)
                out = tmp / f"ft-{len(rows)}-{seed}"
                if cfg is None:
                    res = finetune_run(pruned, out, ft, record={"method": "finetune"})
                else:
                    res = distill_run(args.run, pruned, out, distill=cfg, finetune=ft)
                losses.append(res.final_eval.loss)
                kls.append(kl_to(teacher, load_model(out), windows))
                shutil.rmtree(out)
            row(f"{args.method} {args.ratio:.0%} pruned {name}, {args.steps} steps", losses, kls)
        ptq = post_training_quantize(load_model(args.run), "ternary")
        row("ternary experts, post-training", [validation_losses(ptq, windows, bs)["all"]],
            [kl_to(teacher, ptq, windows)])
        for mode_name, mode in (("ternary", "ternary"),):
            losses, kls = [], []
            for seed in seeds:
                ft = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                    seed=seed)
                out = tmp / f"qat-{seed}"
                res = qat_run(args.run, out, mode=mode, finetune=ft)
                losses.append(res.final_eval.loss)
                kls.append(kl_to(teacher, load_model(out), windows))
                shutil.rmtree(out)
            row(f"{mode_name} experts, QAT {args.steps} steps (STE)", losses, kls)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = environment()
    command = "python benchmarks/compress_distill.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "environment": env, "args": vars(args), "rows": rows,
               "teacher_step": meta.get("step"), "seconds": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), payload)
    lines = [f"Command: `{command}`  ", f"Machine: {env.get('platform')}, torch {env.get('torch')}; "
             f"teacher {args.run} at step {meta.get('step')}; seeds {seeds}; {time.time() - t0:.0f} s.", "",
             "| setting | val loss | spread (std over seeds) | KL(teacher ‖ model) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['loss']:.4f} | {r['spread']:.4f} | {r['kl']:.4f} |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
