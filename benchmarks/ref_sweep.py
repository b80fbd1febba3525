"""The tuning sweep behind the reference models (issue 13): each reference preset trained for a short budget
(250 steps of 16 x 256 tokens on the reference corpus) at the points of a coordinate sweep over the feed-forward
output multiplier (`ffn_out_mult`) and the learning rate, so that each model is compared at its own best.

    python benchmarks/ref_sweep.py --out runs/ref-sweep                       # every model, one after the other
    python benchmarks/ref_sweep.py --models ref-dense --out runs/ref-sweep --threads 1 &   # or one process per
    python benchmarks/ref_sweep.py --models ref-moe --out runs/ref-sweep --threads 1 &     # model, in parallel
    python benchmarks/ref_sweep.py --out runs/ref-sweep --results benchmarks/results/tune   # then: the table

Every point is a run under OUT/runs/MODEL/POINT/ (moekit.train.tune): finished points are reused and interrupted
ones resumed, so the command may be stopped and run again any number of times; with every point finished it
only writes the tables. The best points become the presets' `ffn_out_mult` (moekit/models/presets.py) and the
`ref` budget's per-model learning rate (moekit/ref/budgets.py: REF_TUNED).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.data import prepare_data, reference_data_config  # noqa: E402
from moekit.models.presets import preset  # noqa: E402
from moekit.train.config import TrainConfig  # noqa: E402
from moekit.train.run import val_windows  # noqa: E402
from moekit.train.tune import tune  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402

# per model, in the order the coordinate sweep takes them: the output scale first (it moves the loss most and
# shifts the best learning rate), then the learning rate at the best scale
AXES = {
    "ref-dense": [("ffn_out_mult", [1.0, 4.0, 2.0, 8.0]), ("lr", [3e-3, 1.5e-3])],
    "ref-moe": [("ffn_out_mult", [1.0, 2.0, 4.0, 8.0]), ("lr", [3e-3, 1.5e-3]), ("router_args.load_balance", [0.001])],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(AXES), help=f"comma-separated, of {', '.join(AXES)}")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", default="runs/ref-sweep", help="the runs (OUT/runs/MODEL/POINT) and sweep.md/json")
    ap.add_argument("--results", default=None, help="also copy sweep.md and sweep.json here (with the command)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in AXES]
    if unknown or not names:
        ap.exit(1, f"error: --models expects some of {', '.join(AXES)}, got {args.models!r}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = reference_data_config(seed=0)
    data = prepare_data(data_cfg, progress=False)
    train_cfg = TrainConfig.short_run(args.steps, batch_size=16, seq_len=256, lr=3e-3,
                                      eval_every=max(1, args.steps // 2), eval_windows=32, log_every=10)
    windows = val_windows(data, 256, 32)
    meta = {"data": dataclasses.asdict(data_cfg), "labels": list(data.label_names)}
    best, rows = {}, []
    for name in names:  # one tune() per model: each has its own axes
        res = tune({name: preset(name, vocab_size=data.vocab_size)}, train_cfg, data.train, windows, AXES[name],
                   Path(args.out) / name, mode="coordinate", meta=meta, progress=False)
        best.update(res.best)
        rows += res.rows
    for name, row in best.items():
        print(f"{name}: best {row['settings']} val loss {row['val_loss']:.4f}")
    if args.results:
        out = Path(args.results)
        env = environment()
        write_json(out / "sweep.json", {"benchmark": "ref_sweep", "env": env, "train": train_cfg.to_dict(),
                                        "axes": {n: AXES[n] for n in names}, "rows": rows, "best": best})
        md = [f"Command: `{env['command']}`  ", f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch "
              f"{env['torch']}; {env['date']}. {args.steps} steps of 16 x 256 tokens on the reference corpus, "
              "seed 0; coordinate sweep, axes in order: " + "; ".join(
                  f"{n}: " + ", then ".join(f"{k} {v}" for k, v in AXES[n]) for n in names), ""]
        for name in names:
            md += [f"## {name}", ""] + (Path(args.out) / name / "sweep.md").read_text().splitlines()[2:] + [""]
        atomic_write_text(out / "sweep.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
