"""The classic MoE result: an MoE LM and a dense LM with the same active parameters, same data, steps and
seed. Records the validation curves and the number of steps the MoE needs to reach the dense model's final
validation loss.

--budget tiny (the default): tiny-moe (E=8, k=2) against tiny-dense, trained here in a temporary folder.
--budget ref: the reference models (moekit.ref, `moekit ref build`), for each of --seeds: ref-moe against
ref-dense (equal active FLOPs) and ref-dense-4x (equal total parameters). The runs are moekit.ref's cached,
resumable ones, so reference models already built are reused and an interrupted benchmark continues.
--budget smoke: the same comparison at the reference `smoke` budget (micro models, seconds; for tests).
ref-moe-fg (the fine-grained MoE with shared experts), when built, is compared with ref-dense the same way.
--recorded FILE: result rows of an earlier `moekit ref build --out` (its results.json, e.g.
benchmarks/results/reference/results.json) stand in for models this machine's cache lacks, when the file's
budget settings equal this budget's and the row's parameter count equals the preset's (the cache is per
machine; a recorded curve is the same run's). Rows so used are marked "recorded" in the output.

    python benchmarks/moe_vs_dense.py                     # tiny: 600 steps each, built-in corpus
    python benchmarks/moe_vs_dense.py --steps 100 --eval-every 20
    python benchmarks/moe_vs_dense.py --device cuda --dtype bfloat16 --threads 0   # on a GPU
    python benchmarks/moe_vs_dense.py --budget ref --seeds 0,1                     # hours on 2 CPU cores

Targets (issue 13): the MoE reaches the dense model's final validation loss in <= 0.6x the steps; at the
reference budget it also realises >= 50% of the loss gain of the dense model with its total parameters.
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
from moekit.utils.io import atomic_write_text  # noqa: E402

REF_MODELS = ("ref-dense", "ref-dense-4x", "ref-moe")  # equal active FLOPs, equal total parameters, the MoE
REF_FG = "ref-moe-fg"  # the fine-grained MoE, compared with ref-dense when built


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
    ap.add_argument("--budget", default="tiny", choices=["tiny", "ref", "smoke"],
                    help="tiny: tiny presets here; ref / smoke: moekit.ref's reference models at that budget")
    ap.add_argument("--built-only", action="store_true",
                    help="--budget ref/smoke: compare only the models `moekit ref build` finished (train nothing)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (--budget ref / smoke)")
    ap.add_argument("--recorded", default=None,
                    help="--budget ref/smoke: a results.json of `moekit ref build --out` whose rows stand in for "
                         "models not built here (same budget settings and parameter count only)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/moe_vs_dense.json, _ref.json at --budget ref)")
    args = ap.parse_args()
    if args.out is None:
        args.out = "benchmarks/results/moe_vs_dense" + ("" if args.budget == "tiny" else f"_{args.budget}") + ".json"
    try:  # a device this machine lacks is one line, before any data is built
        where = resolve_device(args.device, args.dtype, bf16_on_cpu=args.bf16_on_cpu)
    except ValueError as exc:
        ap.exit(1, f"error: {exc}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget != "tiny":
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            ap.exit(1, f"error: --seeds expects comma-separated integers, got {args.seeds!r}\n")
        if not seeds:
            ap.exit(1, "error: --seeds names no seed\n")
        try:
            recorded = recorded_rows(args.recorded, args.budget) if args.recorded else {}
        except ValueError as exc:
            ap.exit(1, f"error: {exc}\n")
        compare_ref(args.budget, seeds, args.out, device=args.device, dtype=args.dtype, where=str(where),
                    built_only=args.built_only, recorded=recorded)
        return
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


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def compare_seed(rows: dict[str, dict], steps: int) -> dict:
    """The comparison for one seed from moekit.ref's result rows (model -> row): the MoE's steps to the
    active-matched dense model's final loss (and their ratio to the run's steps), and the fraction of the
    total-params-matched dense model's loss gain over that dense model that the MoE realises; the same for
    ref-moe-fg when its row is there (`fg_*` keys)."""
    dense, dense4, moe = (rows[n]["history"][-1]["loss"] if n in rows else None for n in REF_MODELS)
    reach = steps_to_reach(rows["ref-moe"]["history"], dense)
    gain = None if dense4 is None else dense - dense4
    out = {
        "dense_final_loss": dense, "dense_4x_final_loss": dense4, "moe_final_loss": moe,
        "moe_steps_to_dense_final": reach, "ratio": _ratio(reach, steps), "target_ratio": 0.6,
        "gain_fraction": (dense - moe) / gain if gain is not None and gain > 0 else None, "target_gain_fraction": 0.5,
        "fg_final_loss": None, "fg_steps_to_dense_final": None, "fg_ratio": None, "fg_gain_fraction": None,
    }
    if REF_FG in rows:
        fg = rows[REF_FG]["history"][-1]["loss"]
        fg_reach = steps_to_reach(rows[REF_FG]["history"], dense)
        out.update(fg_final_loss=fg, fg_steps_to_dense_final=fg_reach, fg_ratio=_ratio(fg_reach, steps),
                   fg_gain_fraction=(dense - fg) / gain if gain is not None and gain > 0 else None)
    return out


def recorded_rows(path: str | Path, budget: str) -> dict[tuple[str, int], dict]:
    """(model, seed) -> result row of a `moekit ref build` results.json, checked against `budget`: the file's
    budget settings must equal the budget's, and each row's parameter count the preset's at that vocabulary."""
    import json

    from moekit.models import count_params
    from moekit.ref.budgets import budget_dict, model_config, ref_data_config

    f = Path(path)
    if not f.is_file():
        raise ValueError(f"--recorded: no such file {f}")
    try:
        info = json.loads(f.read_text())
        rows, settings = info["rows"], info["budget"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--recorded: {f} is not a results.json of `moekit ref build` ({exc})") from None
    if settings != budget_dict(budget):
        raise ValueError(f"--recorded: {f} was made under other settings of budget {settings.get('name')!r} than "
                         f"today's {budget!r}; its rows are not this budget's runs")
    out = {}
    for r in rows:
        vocab = ref_data_config(budget, int(r["seed"])).vocab_size  # the corpus's BPE vocabulary (it fills it)
        want = count_params(model_config(r["model"], budget, vocab)).total
        if r["params_total"] != want:
            raise ValueError(f"--recorded: {f}: {r['model']} seed {r['seed']} has {r['params_total']} parameters, "
                             f"the preset today {want}: the preset changed since; rebuild it")
        out[(r["model"], int(r["seed"]))] = {**r, "recorded": str(f)}
    return out


def compare_ref(
    budget: str, seeds: list[int], out: str, *, device: str, dtype: str, where: str, built_only: bool = False,
    recorded: dict[tuple[str, int], dict] | None = None,
) -> dict:
    """Build (or reuse) ref-dense, ref-dense-4x and ref-moe for every seed with moekit.ref.build, compare them
    per seed, and write `out` (JSON) and its .md. Returns the JSON payload. With `built_only`, only what the
    cache holds (plus `recorded` rows for what it lacks) is compared, and ref-moe-fg joins when available."""
    recorded = recorded or {}
    from moekit.ref import BUDGETS, build, built

    steps = BUDGETS[budget].steps
    per_seed, runs = {}, {}
    for seed in seeds:
        names = list(REF_MODELS)
        stand_in = {}
        if built_only:  # what `moekit ref build` finished (or was recorded); ref-dense-4x / ref-moe-fg may be missing
            done = {(r["model"], r["seed"]) for r in built() if r["budget"] == budget and r["status"] == "done"}
            names = [n for n in (*REF_MODELS, REF_FG) if (n, seed) in done]
            stand_in = {n: recorded[(n, seed)] for n in (*REF_MODELS, REF_FG)
                        if (n, seed) in recorded and n not in names}
            if not {"ref-dense", "ref-moe"} <= set(names) | set(stand_in):
                raise SystemExit(f"error: --built-only: ref-dense and ref-moe of seed {seed} are not both built; "
                                 f"run `moekit ref build --budget {budget} --models ref-dense,ref-moe --seed {seed}`")
        rows = {r["model"]: r for r in build(names, budget, seed, device=device, dtype=dtype)} if names else {}
        rows.update(stand_in)
        per_seed[str(seed)] = compare_seed(rows, steps)
        runs[str(seed)] = rows
        s = per_seed[str(seed)]
        print(f"seed {seed}: MoE reaches the dense final loss {s['dense_final_loss']:.4f} at step "
              f"{s['moe_steps_to_dense_final']} (ratio {s['ratio']}, target <= 0.6); gain fraction "
              f"{s['gain_fraction']} of dense-4x's (target >= 0.5)"
              + (f"; ref-moe-fg {s['fg_final_loss']:.4f}, ratio {s['fg_ratio']}" if s["fg_final_loss"] else "")
              + (f" (recorded: {', '.join(sorted(stand_in))})" if stand_in else ""))
    env = environment()
    payload = {"benchmark": "moe_vs_dense", "budget": budget, "seeds": seeds, "env": env, "summary": per_seed,
               "runs": runs}
    write_json(out, payload)

    def fmt(x: float | None, spec: str = ".3f", none: str = "never") -> str:
        return none if x is None else format(x, spec)

    def gain_cell(s: dict) -> str:
        if s["dense_4x_final_loss"] is None:
            return "n/a (ref-dense-4x not built)"
        return "n/a (dense-4x no better)" if s["gain_fraction"] is None else fmt(s["gain_fraction"])

    md = [
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}; trained on {where} in {dtype}; "
        f"{env['date']}. Reference budget `{budget}` ({steps} steps); models from moekit.ref.",
        "",
        "| seed | ref-dense | ref-dense-4x | ref-moe | MoE steps to dense final | ratio (<= 0.6) "
        "| gain fraction (>= 0.5) | ref-moe-fg | fg steps to dense final | fg ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, s in per_seed.items():
        fg_built = s["fg_final_loss"] is not None
        md.append(f"| {seed} | {s['dense_final_loss']:.4f} | {fmt(s['dense_4x_final_loss'], '.4f', 'not built')} "
                  f"| {s['moe_final_loss']:.4f} | {fmt(s['moe_steps_to_dense_final'], '.0f')} | {fmt(s['ratio'])} "
                  f"| {gain_cell(s)} | {fmt(s['fg_final_loss'], '.4f', 'not built')} "
                  f"| {fmt(s['fg_steps_to_dense_final'], '.0f') if fg_built else ''} "
                  f"| {fmt(s['fg_ratio']) if fg_built else ''} |")
    used = sorted({f"{r['model']} seed {seed}" for seed, rs in runs.items() for r in rs.values() if r.get("recorded")})
    if used:
        md += ["", f"Recorded rows (from an earlier `moekit ref build --out`, not rebuilt here): {', '.join(used)}."]
    atomic_write_text(Path(out).with_suffix(".md"), "\n".join(md) + "\n")
    return payload


if __name__ == "__main__":
    main()
