"""The router leaderboard: moekit's LM trained with every router on the built-in corpus, same data,
steps, seed and (nominal) active FLOPs per token, measured side by side (`moekit bench routers`).

Per router it reports validation loss (overall and per domain), training tokens/s, active experts per
token, expert load (max/mean and coefficient of variation), dropped token-slots, and the mutual
information between experts and domains; it writes `leaderboard.md`, `leaderboard.json`,
`loss_curves.png` and `loss_vs_flops.png` into the output folder, one training run per router under
`runs/`. Finished runs are reused when the command is run again with the same budget, seed and dtype;
the device is not part of that comparison (see `same_run`).

The parts: `entries` (what each row trains, the budgets), `measure` (loss, routing statistics and active
FLOPs of a trained model), `report` (the table, JSON and plots); this module runs them.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.bench.claims import compare
from moekit.bench.entries import BUDGETS, ENTRIES, model_config
from moekit.bench.measure import active_flops, measure, tokens_per_s
from moekit.bench.report import write_report
from moekit.bench.seeds import aggregate, seed_run_dir
from moekit.data import DataConfig, prepare_data
from moekit.models import LMConfig
from moekit.train.checkpoint import has_checkpoint, load_model, read_meta
from moekit.train.config import TrainConfig
from moekit.train.device import resolve_device
from moekit.train.report import read_jsonl
from moekit.train.reuse import train_or_reuse
from moekit.train.run import val_windows


@dataclass
class LeaderboardResult:
    """What `run_leaderboard` measured and wrote."""

    out: Path
    rows: list[dict[str, Any]]  # one per router, the leaderboard.json rows
    files: list[Path]  # leaderboard.md, leaderboard.json, the plots


def run_leaderboard(
    budget: str = "smoke",
    routers: list[str] | None = None,
    out: str | Path = "runs/leaderboard",
    *,
    seed: int = 0,
    seeds: list[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    bf16_on_cpu: bool = False,
    progress: bool = True,
    log=print,
) -> LeaderboardResult:
    """Train and measure every entry in `routers` (default: all of ENTRIES) under `budget`, each on `device`
    with forward passes in `dtype` (TrainConfig's fields of the same names).

    One seed (`seed`, or `seeds` of one element): data, model init and data order follow it, one run per entry
    under runs/<entry>/, one row per entry. Several `seeds`: the data is the first seed's for every seed; each
    entry trains once per seed (the first seed in runs/<entry>/, seed k in runs/<entry>/seed<k>/, see
    `moekit.bench.seeds`) and its row holds the mean and spread over seeds; the claims of `moekit.bench.claims`
    are read against them."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; known budgets: {', '.join(BUDGETS)}")
    names = list(ENTRIES) if not routers else list(routers)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise ValueError(f"unknown leaderboard entries {unknown}; known: {', '.join(ENTRIES)}")
    seeds = [seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, found {seeds!r}")
    multi = len(seeds) > 1
    where = resolve_device(device, dtype, bf16_on_cpu=bf16_on_cpu)  # refused before anything is written
    b = BUDGETS[budget]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = b.data_config(seeds[0])
    data = prepare_data(data_cfg, progress=progress)
    windows = val_windows(data, b.seq_len, b.eval_windows)
    rows, run_dirs = [], {}
    total = len(names) * len(seeds)
    for name in names:
        entry = ENTRIES[name]
        cfg = model_config(entry, b, data.vocab_size)
        per_seed = []
        for s in seeds:
            base_train = TrainConfig.short_run(
                b.steps, batch_size=b.batch_size, seq_len=b.seq_len, lr=b.lr, eval_every=b.eval_every,
                eval_windows=b.eval_windows, log_every=1, seed=s, device=device, dtype=dtype,
                bf16_on_cpu=bf16_on_cpu,
            )
            train_cfg = dataclasses.replace(base_train, **entry.train)
            run_dir = seed_run_dir(out, name, s, seeds[0])
            label = f"{name} seed {s}" if multi else name
            n_done = len(rows) * len(seeds) + len(per_seed) + 1
            per_seed.append(_train_and_measure(
                name, entry, cfg, train_cfg, run_dir, b=b, budget=budget, data=data, data_cfg=data_cfg,
                windows=windows, where=str(where), progress=progress,
                log=lambda msg, label=label, n=n_done: log(f"[{n}/{total}] {label}: {msg}"),
            ))
            if s == seeds[0]:
                run_dirs[name] = run_dir
        rows.append(aggregate(per_seed, seeds) if multi else per_seed[0])
    info = {
        "budget": budget, "budget_settings": dataclasses.asdict(b), "seed": seeds[0], "domains": list(data.label_names),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"
        + ("" if (device, dtype) == ("cpu", "float32") else f", {where} in {dtype}"),
        "command": f"moekit bench routers --budget {budget}" + (f" --routers {','.join(names)}" if routers else "")
        + (f" --seeds {','.join(map(str, seeds))}" if multi else (f" --seed {seeds[0]}" if seeds[0] else ""))
        + (f" --device {device}" if device != "cpu" else "") + (f" --dtype {dtype}" if dtype != "float32" else "")
        + (" --bf16-on-cpu" if bf16_on_cpu else ""),
        "claims": compare(rows),
    }
    if multi:
        info["seeds"] = seeds
    return LeaderboardResult(out, rows, write_report(out, info, rows, run_dirs))


def _train_and_measure(name: str, entry, cfg: LMConfig, train_cfg: TrainConfig, run_dir: Path, *, b, budget: str,
                       data, data_cfg: DataConfig, windows, where: str, progress: bool, log) -> dict[str, Any]:
    """One run of the leaderboard: reused when finished, resumed when interrupted, else trained; then measured.
    A run folder holding another model, training config or data seed is refused (FileExistsError)."""
    meta = {"data": dataclasses.asdict(data_cfg), "labels": list(data.label_names), "budget": budget,
            "trained_on": where}
    t0 = time.perf_counter()
    trained = train_or_reuse(  # a fresh run, or an interrupted one resumed; Ctrl-C raises (no half run ranked)
        cfg, train_cfg, data.train, windows, run_dir, meta=meta, progress=progress, label=name,
        log=lambda _: log(f"training {b.steps} steps" + (" (resuming)" if has_checkpoint(run_dir) else "")),
        data={"seed": data_cfg.seed},
    )
    seconds = time.perf_counter() - t0
    model = load_model(run_dir)
    m = measure(model, windows, b.batch_size)
    return {
        "router": name, "registered": entry.router,
        "router_args": cfg.router_args if entry.router else None,
        "note": entry.note, "val_loss": m.loss, "val_loss_per_domain": m.loss_per_domain,
        "tokens_per_s": tokens_per_s(run_dir), "trained_on": read_meta(run_dir).get("trained_on", "cpu"),
        "dtype": train_cfg.dtype, "train_seconds": seconds if trained else None,
        "active_experts": m.active_experts, "load_max_over_mean": m.load_max_over_mean, "load_cv": m.load_cv,
        "dropped_frac": m.dropped_frac, "expert_domain_mi_bits": m.expert_domain_mi,
        "depth_processed": {str(j): f for j, f in m.depth_fractions.items()} or None,
        "active_flops_per_token": active_flops(cfg, m),
        "params_total": sum(p.numel() for p in model.parameters()),  # shared tensors (WideNet, ties) once
        "history": read_jsonl(run_dir / "eval.jsonl"),
    }
