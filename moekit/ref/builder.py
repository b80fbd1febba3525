"""`build`: train the reference models resumably into the cache, measure them, write the result table.

Each model trains into `<cache root>/ref/<budget>/<name>-s<seed>/` (a `moekit train` run folder: checkpoint,
tokenizer, logs). A finished model is reused, an interrupted one (Ctrl-C, SIGTERM, a killed process) resumes
from its last checkpoint, any number of times; a folder holding another model or training config is refused.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from moekit.bench.measure import tokens_per_s
from moekit.data import cache_root, prepare_data
from moekit.models import LMConfig, count_params
from moekit.ref.budgets import MODELS, budget_dict, check_model, get_budget, model_config, ref_data_config, train_config
from moekit.train.checkpoint import load_model, read_meta
from moekit.train.device import resolve_device
from moekit.train.evaluate import evaluate
from moekit.train.report import read_jsonl
from moekit.train.reuse import run_state, train_or_reuse
from moekit.train.run import val_windows
from moekit.utils.io import atomic_copy, atomic_write_text

WALL_FILE = "ref_wall.json"  # seconds spent training the run, summed over every (resumed) invocation


def budget_dir(budget: str, cache_dir: str | Path | None = None) -> Path:
    """`<cache root>/ref/<budget>`: the runs and results.json/results.md of one budget."""
    return cache_root(cache_dir) / "ref" / get_budget(budget).name


def run_dir(name: str, budget: str = "ref", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Where the reference model `name` of `budget` and `seed` trains."""
    return budget_dir(budget, cache_dir) / f"{name}-s{seed}"


def build_command(names: list[str] | tuple[str, ...], budget: str, seed: int) -> str:
    """The `moekit ref build` command line that builds `names`."""
    return f"moekit ref build --budget {budget} --models {','.join(names)} --seed {seed}"


def _wall_seconds(folder: Path) -> float:
    f = folder / WALL_FILE
    return float(json.loads(f.read_text())["seconds"]) if f.is_file() else 0.0


def build(
    names: list[str] | tuple[str, ...] = MODELS,
    budget: str = "ref",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Train (or reuse, or resume) the reference models `names` under `budget` and `seed`, measure each, and
    write `results.json` + `results.md` into the budget's cache folder (and into `out` when given).
    Returns the result rows (one per model, in `names` order). An interruption raises KeyboardInterrupt after
    the run in progress checkpointed: the same call continues it."""
    b = get_budget(budget)
    names = list(names)
    for n in names:
        check_model(n)
    if not names:
        raise ValueError("no reference models to build: name at least one")
    where = resolve_device(device, dtype)  # refused before anything is written
    data_cfg = ref_data_config(b, seed)
    data = prepare_data(data_cfg, cache_dir=cache_dir, progress=progress)
    windows = val_windows(data, b.seq_len, b.eval_windows)
    rows = []
    same_data = dataclasses.asdict(data_cfg)  # a reference run is another one when any data setting differs

    for i, name in enumerate(names):
        cfg = model_config(name, b, data.vocab_size)
        train_cfg = train_config(b, seed, device=device, dtype=dtype, model=name)
        folder = run_dir(name, b.name, seed, cache_dir)
        if run_state(folder, cfg, train_cfg, data=same_data) == "done":
            log(f"[{i + 1}/{len(names)}] {name} (seed {seed}): built, reused from {folder}")
        else:
            meta = {"data": dataclasses.asdict(data_cfg), "labels": list(data.label_names), "budget": b.name,
                    "reference": name, "trained_on": str(where)}
            t0 = time.perf_counter()
            try:  # Ctrl-C / SIGTERM raises KeyboardInterrupt after a checkpoint: the same build resumes it
                train_or_reuse(cfg, train_cfg, data.train, windows, folder, meta=meta, progress=progress,
                               files={"tokenizer.json": data.directory / "tokenizer.json"}, data=same_data,
                               log=log, label=f"[{i + 1}/{len(names)}] {name} (seed {seed}) in {folder}")
            finally:
                seconds = _wall_seconds(folder) + time.perf_counter() - t0
                if folder.is_dir():
                    atomic_write_text(folder / WALL_FILE, json.dumps({"seconds": seconds}) + "\n")
        rows.append(_measure(name, folder, cfg, b, windows))
    _write_results(b.name, seed, rows, budget_dir(b.name, cache_dir), out, names, str(where))
    return rows


def _measure(name: str, folder: Path, cfg: LMConfig, b, windows) -> dict[str, Any]:
    """One results row: sizes, tokens seen, final validation loss (overall and per domain), speed, wall time."""
    model = load_model(folder)
    ev = evaluate(model, windows, b.batch_size)
    counts = count_params(cfg)
    meta = read_meta(folder)
    return {
        "model": name, "run": folder.name, "params_total": counts.total, "params_active": counts.active,
        "steps": meta["step"], "tokens": meta["step"] * b.tokens_per_step, "val_loss": ev.loss,
        "val_loss_per_domain": ev.loss_per_label, "tokens_per_s": tokens_per_s(folder),
        "wall_minutes": _wall_seconds(folder) / 60, "trained_on": meta.get("trained_on", "cpu"),
        "history": read_jsonl(folder / "eval.jsonl"),
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of `rows` (domains as columns)."""
    domains = sorted({d for r in rows for d in r["val_loss_per_domain"]})
    head = ["model", "params total", "params active", "steps", "tokens", "val loss", *domains, "tokens/s", "wall min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        per = [f"{r['val_loss_per_domain'][d]:.3f}" if d in r["val_loss_per_domain"] else "" for d in domains]
        cells = [r["model"], f"{r['params_total']:,}", f"{r['params_active']:,}", str(r["steps"]), f"{r['tokens']:,}",
                 f"{r['val_loss']:.3f}", *per, f"{r['tokens_per_s']:,.0f}", f"{r['wall_minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_results(budget: str, seed: int, rows: list[dict], folder: Path, out: str | Path | None,
                   names: list[str], where: str) -> None:
    """results.json and results.md (atomic) in `folder`, copied to `out` when given. Rows of models this call
    did not measure (another seed, a model left out) stay in the files: they are keyed by (model, seed)."""
    prev = folder / "results.json"
    old = json.loads(prev.read_text()).get("rows", []) if prev.is_file() else []
    keep = [r for r in old if (r["model"], r["seed"]) not in {(n, seed) for n in names}]
    new = keep + [{**r, "seed": seed} for r in rows]
    new.sort(key=lambda r: (r["seed"], r["model"]))
    info = {
        "budget": budget_dict(budget), "command": build_command(names, budget, seed),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {where}",
        "rows": new,
    }
    md = (f"# Reference models, budget `{budget}`\n\nBuilt with `{info['command']}` on {info['machine']} "
          f"(torch {torch.__version__}). Validation loss in nats per token on the built-in corpus's held-out "
          "documents, per domain.\n\n")
    for s in sorted({r["seed"] for r in new}):
        md += f"## seed {s}\n\n" + results_table([r for r in new if r["seed"] == s]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(info, indent=1) + "\n")
    atomic_write_text(folder / "results.md", md)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "results.md"):
            atomic_copy(folder / f, out / f)
