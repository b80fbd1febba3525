"""Compression of the reference MoE: every compression method (`--methods`, default all of
`moekit.compress.methods.list_compressors()`: pruning, MC-SMoE merging, SVD decomposition) at 25% and 50% removed
(of the experts; for `svd`, of the routed expert parameters; calibrated methods on three draws of training
windows, `svd` once: it uses no calibration) and int8 / int4 quantized experts, against the uncompressed model and
a unigram model.

    python benchmarks/compress.py                        # the `ref` budget's ref-moe (build it first:
                                                         #   moekit ref build --models ref-moe)
    python benchmarks/compress.py --budget smoke --out /tmp/compress   # seconds, the smoke reference models
    python benchmarks/compress.py --run RUN --out /tmp/compress        # any trained moekit run folder instead

Per row: validation loss overall and per domain (mean over calibration draws, and their spread), parameters,
bytes of the routed experts, and the share of the model's loss gap to the unigram baseline that compression gave
up: (loss after - loss before) / (unigram loss - loss before). The issue's goal: at 25% of experts removed, the
best method loses <= 2% of that gap and beats frequency pruning. Nothing is trained; the model is loaded fresh
for every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.compress import calibrate, calibration_batches  # noqa: E402
from moekit.compress.methods import CompressOptions, get_compressor, list_compressors  # noqa: E402
from moekit.compress.run import param_counts, validation_losses  # noqa: E402
from moekit.data import prepare_data  # noqa: E402
from moekit.ref import load as load_ref  # noqa: E402
from moekit.ref.budgets import get_budget, ref_data_config  # noqa: E402
from moekit.train.evaluate import validation_windows  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402


def unigram_loss(train_tokens: np.ndarray, windows: dict[str, tuple[torch.Tensor, torch.Tensor]], vocab: int
                 ) -> dict[str, float]:
    """Cross-entropy of the training split's token frequencies (add-one smoothed) on the validation targets:
    overall (token-weighted, as `evaluate` weighs domains) and per domain."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = torch.from_numpy(np.log(counts / counts.sum()))
    per, n, total = {}, 0, 0.0
    for label, (_, y) in windows.items():
        nll = -logp[y.reshape(-1)]
        per[label] = float(nll.mean())
        n += nll.numel()
        total += float(nll.sum())
    return {"all": total / n, **per}


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts' tensors (parameters and buffers: packed weights and scales when quantized)."""
    from moekit.compress.calibrate import moe_layers

    return sum(t.numel() * t.element_size() for _, layer in moe_layers(model)
               for t in [*layer.experts.parameters(), *layer.experts.buffers()])


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="ref", help="reference budget of the model (ref | smoke)")
    ap.add_argument("--model", default="ref-moe")
    ap.add_argument("--run", default=None, help="a trained moekit run folder to compress instead of a reference model")
    ap.add_argument("--seed", type=int, default=0, help="the reference model's seed")
    ap.add_argument("--methods", default=",".join(list_compressors()), help="comma-separated compression methods")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--calib-seeds", default="0,1,2", help="calibration draws (the spread of each row)")
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--quant", default="8,4", help="bit-widths of quantized experts ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/compress")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:  # the run's own model, data, validation windows and batch size
        from moekit.data import DataConfig
        from moekit.train.checkpoint import load_model, read_meta

        meta = read_meta(args.run)
        data = prepare_data(DataConfig(**meta["data"]), progress=False)
        t = meta["train"]
        b = SimpleNamespace(name=None, seq_len=t["seq_len"], eval_windows=t["eval_windows"],
                            batch_size=t["batch_size"])

        def load(*_: object) -> torch.nn.Module:
            return load_model(args.run).eval()

        args.model, args.budget = str(args.run), "run"
    else:
        b = get_budget(args.budget)
        data = prepare_data(ref_data_config(b, args.seed), progress=False)
        load = load_ref
    windows = validation_windows(data, b.seq_len, b.eval_windows)
    base = load(args.model, b.name, args.seed)
    before = validation_losses(base, windows, b.batch_size)
    unigram = unigram_loss(data.train.tokens, windows, base.config.vocab_size)
    gap = unigram["all"] - before["all"]  # <= 0 for an untrained model: no gap to lose, "gap lost" is n/a

    def lost(loss: float) -> float | None:
        return (loss - before["all"]) / gap if gap > 0 else None

    rows = [{"method": "none", "ratio": 0.0, "loss": before, "loss_std": 0.0, "params": param_counts(base)[0],
             "expert_bytes": expert_bytes(base), "gap_lost": lost(before["all"])}]
    seeds = [int(s) for s in args.calib_seeds.split(",") if s.strip()]
    for ratio in (float(r) for r in args.ratios.split(",") if r.strip()):
        for method in (m.strip() for m in args.methods.split(",") if m.strip()):
            spec = get_compressor(method)
            losses = []
            for s in seeds if spec.calibrated else seeds[:1]:
                model = load(args.model, b.name, args.seed)
                cal = None
                if spec.calibrated:
                    cal = calibrate(model, calibration_batches(data, args.calib_batches, b.seq_len, seed=s), seed=s)
                spec.apply(model, cal, CompressOptions(ratio=ratio))
                losses.append(validation_losses(model, windows, b.batch_size))
            mean = {k: statistics.fmean(x[k] for x in losses) for k in losses[0]}
            std = statistics.stdev([x["all"] for x in losses]) if len(losses) > 1 else 0.0
            rows.append({"method": method, "ratio": ratio, "loss": mean, "loss_std": std,
                         "loss_per_seed": [x["all"] for x in losses], "params": param_counts(model)[0],
                         "expert_bytes": expert_bytes(model), "gap_lost": lost(mean["all"])})
            print(f"{method} at {ratio:.0%}: {mean['all']:.4f} +- {std:.4f} ({pct(rows[-1]['gap_lost'])} of the gap)")
    for bits in (int(x) for x in args.quant.split(",") if x.strip()):
        from moekit.compress import quantize_experts

        model = quantize_experts(load(args.model, b.name, args.seed), bits=bits,
                                 group_size=min(128, base.config.dim, base.config.expert_hidden))
        loss = validation_losses(model, windows, b.batch_size)
        rows.append({"method": f"int{bits} experts", "ratio": 0.0, "loss": loss, "loss_std": 0.0,
                     "params": param_counts(base)[0], "expert_bytes": expert_bytes(model),
                     "gap_lost": lost(loss["all"])})
        print(f"int{bits}: {loss['all']:.4f} ({pct(rows[-1]['gap_lost'])} of the gap)")
    env = environment()
    out = Path(args.out)
    write_json(out / "compress.json", {"benchmark": "compress", "env": env, "budget": args.budget,
                                       "model": args.model, "seed": args.seed, "calib_seeds": seeds,
                                       "unigram": unigram, "rows": rows})
    domains = [k for k in before if k != "all"]
    md = [f"Command: `{env['command']}`  ",
          f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}; {env['date']}. Model "
          f"`{args.model}` (budget `{args.budget}`, seed {args.seed}); calibration draws {seeds}, "
          f"{args.calib_batches} batches of 8 x {b.seq_len} training tokens each. Unigram baseline "
          f"{unigram['all']:.4f}; gap = unigram - uncompressed = {gap:.4f}.", "",
          "(`svd` removes that share of the routed expert parameters, not of the experts.)", "",
          "| method | experts removed | val loss | spread (std over draws) | " + " | ".join(domains)
          + " | params | expert bytes | gap lost |",
          "|---|---:|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['ratio']:.0%} | {r['loss']['all']:.4f} | {r['loss_std']:.4f} | "
                  + " | ".join(f"{r['loss'][d]:.4f}" for d in domains)
                  + f" | {r['params']:,} | {r['expert_bytes']:,} | {pct(r['gap_lost'])} |")
    atomic_write_text(out / "compress.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
