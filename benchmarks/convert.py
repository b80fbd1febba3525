"""The sparse-upcycling headline: from a trained dense checkpoint, continued training of the upcycled MoE
(E=8, top-2) against continued training of the dense model, for the same steps on the same batches (same data,
train config and seed: the trainer draws batches from a generator seeded by the seed alone). Records both
validation curves and the ratio of steps the MoE needs to reach the continued dense model's final loss
(issue 15's goal: <= 0.6). Also: the validation loss of each split (MoEfication) right after conversion,
before any training, against the dense model's.

    python benchmarks/convert.py --quick                  # trains a micro dense model first; about a minute
    python benchmarks/convert.py                          # from moekit.ref's ref-dense (`moekit ref build`)
    python benchmarks/convert.py --src RUN --steps 300    # from any dense moekit run folder
    python benchmarks/convert.py --btx --quick            # Branch-Train-Mix on the built-in domains; minutes

BTX (`--btx`): from the seed, one branch per built-in domain trained on that domain only, mixed by BTX (their FFNs
as experts, the rest averaged, top-2 router) and trained briefly on all domains; against the seed trained on all
domains for the same total steps (branches + mix). Per-domain validation loss of each.

Both continuations start with a fresh optimiser and schedule (`train(init=...)`, what `moekit train --init` does).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from moe_vs_dense import steps_to_reach  # noqa: E402

from moekit.convert import SplitConfig, UpcycleConfig, load_dense  # noqa: E402
from moekit.convert.run import convert_model, convert_run  # noqa: E402
from moekit.data import DataConfig, prepare_data  # noqa: E402
from moekit.models import LMConfig, count_params  # noqa: E402
from moekit.models.presets import preset  # noqa: E402
from moekit.train import TrainConfig, train  # noqa: E402
from moekit.train.checkpoint import read_meta  # noqa: E402
from moekit.train.evaluate import evaluate  # noqa: E402
from moekit.train.run import val_windows  # noqa: E402

SPLITS = {  # name -> SplitConfig of the splits measured right after conversion (E=8, top-2 like the upcycle)
    "split-weights": dict(cluster="weights"),
    "split-activations": dict(cluster="activations"),
}


def quick_source(tmp: Path, steps: int, seed: int) -> Path:
    """A micro dense model trained for `steps` on a small built-in corpus (so the script checks in a minute)."""
    data_cfg = DataConfig(vocab_size=512, seed=seed, max_chars_per_domain=200_000)
    data = prepare_data(data_cfg, progress=False)
    mcfg = preset("micro-dense", vocab_size=data.vocab_size)
    tcfg = TrainConfig.short_run(steps, batch_size=16, seq_len=32, lr=3e-3, eval_every=steps, eval_windows=8,
                                 seed=seed)
    run = tmp / "dense-src"
    train(mcfg, tcfg, data.train, val_windows(data, 32, 8), run, progress=False,
          meta={"data": dataclasses.asdict(data_cfg)}, files={"tokenizer.json": data.directory / "tokenizer.json"})
    return run


class DomainOnly:
    """A training split that draws windows from one label's segment only (a BTX branch's data)."""

    def __init__(self, data, label: int) -> None:
        self.data = copy.copy(data)
        self.data.segments = {label: data.segments[label]}

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        return self.data.sample_batch(batch_size, seq_len, generator)


def btx_benchmark(args: argparse.Namespace) -> None:
    """Seed -> one branch per domain -> BTX MoE + a short router/all-parameter training, vs the dense seed trained on
    all domains for the same total steps; per-domain validation losses (JSON + markdown)."""
    from moekit.convert.btx import BTXConfig, btx
    from moekit.train.checkpoint import save_checkpoint

    branch_steps = args.steps or (40 if args.quick else 200)
    mix_steps = max(1, branch_steps // 2)
    out = args.out or f"benchmarks/results/convert_btx{'_quick' if args.quick else ''}.json"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = quick_source(tmp, 150, args.seed) if args.quick or not args.src else Path(args.src)
        meta = read_meta(src)
        data = prepare_data(DataConfig(**meta["data"]), progress=False)
        seq_len, bs = int(meta["train"]["seq_len"]), args.batch_size or int(meta["train"]["batch_size"])
        windows = val_windows(data, seq_len, int(meta["train"]["eval_windows"]))
        mcfg = LMConfig.from_dict(meta["model"])
        losses = {"seed": evaluate(load_dense(src).model, windows, batch_size=bs).loss_per_label}

        def cont(name, cfg, init, steps, train_data):
            tcfg = TrainConfig.short_run(steps, batch_size=bs, seq_len=seq_len, lr=args.lr, eval_every=steps,
                                         eval_windows=int(meta["train"]["eval_windows"]), seed=args.seed,
                                         device=args.device)
            train(cfg, tcfg, train_data, windows, tmp / name, init=init, progress=False)
            model = load_dense(tmp / name).model if not cfg.num_experts else None
            if model is None:
                from moekit.train.checkpoint import load_model

                model = load_model(tmp / name)
            losses[name] = evaluate(model, windows, batch_size=bs).loss_per_label
            print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses[name].items()))
            return model

        labels = list(data.label_names)
        branches = [cont(f"branch-{lab}", mcfg, src, branch_steps, DomainOnly(data.train, i))
                    for i, lab in enumerate(labels)]
        moe = btx(branches, BTXConfig(k=min(2, len(branches)), seed=args.seed))
        save_checkpoint(tmp / "btx-mixed", moe, {})
        losses["btx-at-mix"] = evaluate(moe, windows, batch_size=bs).loss_per_label
        cont("btx", moe.config, tmp / "btx-mixed", mix_steps, data.train)
        total = branch_steps * len(labels) + mix_steps
        cont("dense", mcfg, src, total, data.train)
    params = {"dense": count_params(mcfg).as_dict(), "btx": count_params(moe.config).as_dict()}
    env = environment()
    write_json(out, {"benchmark": "convert_btx", "env": env, "branch_steps": branch_steps, "mix_steps": mix_steps,
                     "dense_steps": total, "seed": args.seed, "val_loss_per_domain": losses, "params": params})
    md = [f"Command: `{env['command']}`  ", f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch "
          f"{env['torch']}; {env['date']}; seed {args.seed} (one seed: no spread measured)", "",
          f"Branches: {branch_steps} steps each on one domain; BTX mix: top-2 over {len(labels)} experts, "
          f"{mix_steps} steps on all domains; dense: {total} steps on all domains (same total steps; the BTX "
          f"model has {params['btx']['active']:,d} active of {params['btx']['total']:,d} parameters, the dense "
          f"{params['dense']['total']:,d}).", "",
          "| model | " + " | ".join(labels) + " | mean |", "|---" * (len(labels) + 2) + "|"]
    for name, per in losses.items():
        md.append(f"| {name} | " + " | ".join(f"{per[lab]:.4f}" for lab in labels)
                  + f" | {sum(per.values()) / len(per):.4f} |")
    Path(out).with_suffix(".md").write_text("\n".join(md) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None, help="dense moekit run folder (default: moekit.ref's ref-dense)")
    ap.add_argument("--quick", action="store_true", help="train a micro dense model first, short continuation")
    ap.add_argument("--budget", default="ref", help="moekit.ref budget of ref-dense (without --src/--quick)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the continuation (and of ref-dense)")
    ap.add_argument("--steps", type=int, default=None, help="continued-training steps (default 400; quick 40)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both continuations")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the source run's")
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps / 10")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/convert[_btx][_quick].json)")
    ap.add_argument("--btx", action="store_true", help="the Branch-Train-Mix measurement instead (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.btx:
        btx_benchmark(args)
        return
    steps = args.steps or (40 if args.quick else 400)
    out = args.out or f"benchmarks/results/convert{'_quick' if args.quick else ''}.json"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.quick:
            src = quick_source(tmp, 150, args.seed)
        elif args.src:
            src = Path(args.src)
        else:
            from moekit.ref.load import built_dir

            src = built_dir("ref-dense", args.budget, args.seed)
        meta = read_meta(src)
        data = prepare_data(DataConfig(**meta["data"]), progress=False)
        seq_len = int(meta["train"]["seq_len"])
        windows = val_windows(data, seq_len, int(meta["train"]["eval_windows"]))
        bs = args.batch_size or int(meta["train"]["batch_size"])
        source = load_dense(src)
        dense_loss = evaluate(source.model, windows, batch_size=bs).loss
        print(f"source {src}: validation loss {dense_loss:.4f}")
        moe_dir = tmp / "moe"
        summary = convert_run("upcycle", src, moe_dir, upcycle_cfg=UpcycleConfig(num_experts=args.experts, k=args.k))
        print(summary.table())
        at_conversion = {"upcycle": dense_loss}
        from moekit.compress.calibrate import calibration_batches

        cal = calibration_batches(data, 8, seq_len, seed=args.seed)
        for name, over in SPLITS.items():
            model, s = convert_model("split", source, split_cfg=SplitConfig(num_experts=args.experts, k=args.k,
                                                                                **over), calib_batches=cal)
            at_conversion[name] = evaluate(model, windows, batch_size=bs).loss
            at_conversion[name + "_router_recall"] = s.extra.get("router recall of the true top-k experts per block")
            at_conversion[name + "_constant_recall"] = s.extra.get(
                "recall of a constant guess (the most frequent top-k) per block")
            print(f"{name}: validation loss right after conversion {at_conversion[name]:.4f} (dense {dense_loss:.4f})")
        tcfg = TrainConfig.short_run(steps, batch_size=bs, seq_len=seq_len, lr=args.lr,
                                     eval_every=args.eval_every or max(1, steps // 10),
                                     eval_windows=int(meta["train"]["eval_windows"]), seed=args.seed,
                                     device=args.device)
        runs = {}
        for name, init in (("dense", src), ("moe", moe_dir)):
            mcfg = LMConfig.from_dict(read_meta(init)["model"])
            res = train(mcfg, tcfg, data.train, windows, tmp / f"cont-{name}", init=init, progress=False)
            runs[name] = {"params": count_params(mcfg).as_dict(), "history": res.history, "train_log": res.train_log}
            print(f"{name}: continued {steps} steps, validation loss {res.history[-1]['loss']:.4f}")
    target = runs["dense"]["history"][-1]["loss"]
    reach = steps_to_reach(runs["moe"]["history"], target)
    ratio = reach / steps if reach is not None else None
    result = {
        "source": str(src), "source_loss": dense_loss, "dense_final_loss": target,
        "moe_final_loss": runs["moe"]["history"][-1]["loss"], "moe_steps_to_dense_final": reach, "ratio": ratio,
        "target_ratio": 0.6, "loss_right_after_conversion": at_conversion, "seed": args.seed,
    }
    print(f"upcycled MoE reaches the continued dense model's final loss {target:.4f} at step {reach} of {steps}: "
          f"ratio {'never' if ratio is None else round(ratio, 3)} (target <= 0.6)")
    env = environment()
    write_json(out, {"benchmark": "convert", "env": env, "train": tcfg.to_dict(), "summary": result, "runs": runs})
    md = [f"Command: `{env['command']}`  ", f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch "
          f"{env['torch']}; {env['date']}; seed {args.seed} (one seed: no spread measured)", "",
          "| step | dense val loss | upcycled MoE val loss |", "|---:|---:|---:|"]
    for d, m in zip(runs["dense"]["history"], runs["moe"]["history"], strict=True):
        md.append(f"| {d['step']} | {d['loss']:.4f} | {m['loss']:.4f} |")
    md += ["", f"MoE steps to the continued dense model's final loss: {reach} of {steps} (ratio {ratio}).", "",
           "| model right after conversion | val loss |", "|---|---:|", f"| dense | {dense_loss:.4f} |"]
    md += [f"| {k} | {v:.4f} |" for k, v in at_conversion.items() if not k.endswith("recall")]
    Path(out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
