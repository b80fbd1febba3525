"""The quality half of benchmarks/adapt.py: plain LoRA vs each mixture at equal trainable parameters and steps on a
small dense moekit LM, per-domain validation loss over seeds (run it through `python benchmarks/adapt.py --quality`)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moekit.adapt import attach, finetune, method_config


def train_base(steps: int, out: Path) -> Path:
    """A tiny-dense run on the built-in domains, `steps` steps (the CLI, so it is exactly what users run)."""
    cmd = [sys.executable, "-m", "moekit.cli.main", "train", "--preset", "tiny-dense", "--out", str(out),
           "--steps", str(steps), "--batch-size", "8", "--seq-len", "64", "--vocab-size", "2048",
           "--set", "max_chars_per_domain=400000", "--set", "eval_windows=8", "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit_rank(base: torch.nn.Module, name: str, kw: dict, budget: int) -> tuple[int, int]:
    """The rank (1..32) whose trainable count is closest to `budget`, and that count."""
    import copy

    best = None
    for rank in range(1, 33):
        try:
            n = trainable(attach(copy.deepcopy(base), method_config(name, rank=rank, **kw)))
        except ValueError:
            continue  # e.g. SMoRA's k ranks need rank >= k
        if n > 2 * budget:
            break
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (rank, n)
    if best is None:
        raise ValueError(f"{name}: no rank fits")
    return best


def quality(args: Any, methods: dict[str, dict]) -> dict[str, Any]:
    from moekit.data import DataConfig, prepare_data
    from moekit.train.checkpoint import checkpoint_dir, load_model, read_meta
    from moekit.train.evaluate import evaluate, validation_windows

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="adapt-quality-")
    run = args.run or train_base(args.base_steps, Path(tmp.name) / "base")
    ckpt = checkpoint_dir(run)
    meta = read_meta(ckpt)
    train_cfg = meta["train"]
    data = prepare_data(DataConfig(**meta["data"]), progress=False)
    seq_len, batch = train_cfg["seq_len"], train_cfg["batch_size"]
    windows = validation_windows(data, seq_len, train_cfg["eval_windows"])
    base = load_model(ckpt)
    before = evaluate(base, windows, batch_size=batch)
    domains = sorted(before.loss_per_label)
    print(f"base {run}: {meta['model'].get('preset', '') if isinstance(meta.get('model'), dict) else ''}"
          f" loss {before.loss:.4f} ({', '.join(f'{d} {before.loss_per_label[d]:.4f}' for d in domains)})")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    budget = trainable(attach(load_model(ckpt), method_config("lora", rank=args.rank, targets=targets)))
    rows: dict[str, Any] = {}
    for label, kw in methods.items():
        name, kw = kw.get("method", label), {k: v for k, v in kw.items() if k != "method"}
        rank, n = fit_rank(base, name, kw, budget)
        per_seed = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = attach(load_model(ckpt), method_config(name, rank=rank, **kw))
            finetune(model, data.train, steps=args.steps, batch_size=batch, seq_len=seq_len, lr=args.lr, seed=seed)
            r = evaluate(model, windows, batch_size=batch)
            per_seed.append({"all": r.loss, **r.loss_per_label})
        keys = ["all", *domains]
        rows[label] = {"rank": rank, "trainable": n, "per_seed": per_seed,
                      "mean": {k: statistics.fmean(s[k] for s in per_seed) for k in keys},
                      "spread": {k: max(s[k] for s in per_seed) - min(s[k] for s in per_seed) for k in keys}}
        print(f"{label:16s} rank {rank:2d} trainable {n:8,d}  " + "  ".join(
            f"{k} {rows[label]['mean'][k]:.4f}±{rows[label]['spread'][k]:.4f}" for k in keys), flush=True)
    ref = rows["lora"]
    print("\nvs plain LoRA (negative: lower loss than LoRA; 'not seen' when |gap| < 2 x the larger spread)")
    for name, r in rows.items():
        if name == "lora":
            continue
        cells = []
        for k in ["all", *domains]:
            gap = r["mean"][k] - ref["mean"][k]
            seen = abs(gap) >= 2 * max(r["spread"][k], ref["spread"][k])
            r.setdefault("gap_vs_lora", {})[k] = {"gap": gap, "seen": seen}
            cells.append(f"{k} {gap:+.4f}{'' if seen else ' (not seen)'}")
        print(f"{name:16s} " + "  ".join(cells))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    tmp.cleanup()
    return {"base": str(run), "base_loss": {"all": before.loss, **before.loss_per_label}, "budget": budget,
            "steps": args.steps, "lr": args.lr, "seeds": args.seeds, "methods": rows}
