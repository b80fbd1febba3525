"""`tune`: a small sweep per model over learning rate and scale multipliers, so that every model in a comparison
is trained at its own best and no comparison is decided by a mistuned baseline.

An axis is a config field and its values: a TrainConfig field (`lr`, `warmup_steps`, ...), an LMConfig field
(`ffn_out_mult`, `embed_init_mult`, ...) or one entry of a dict field (`router_args.load_balance`), the keys of
`moekit train --set`. Two modes:

- `grid`: every combination of the axes' values.
- `coordinate`: one axis at a time, in the given order; the other axes stay at the best values found so far
  (at first, each axis's first value). Costs the sum of the axes' lengths instead of their product; it finds
  the grid's best when the axes' effects on the loss do not interact, which is what it assumes.

Axes that do not apply to a model (router or expert settings of a dense model) are left out for it. Every point
is a training run under `<out>/runs/<model>/<point>/`, reused when finished and resumed when interrupted
(`moekit.train.reuse`), so a sweep may be stopped and continued any number of times. The result, `sweep.json`
and `sweep.md` in `out`, lists every point's final validation loss and each model's best point.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.models import LMConfig
from moekit.train.config import TrainConfig
from moekit.train.overrides import apply_overrides, parse_value
from moekit.train.report import read_jsonl
from moekit.train.reuse import train_or_reuse
from moekit.train.trainer import TrainSource
from moekit.utils.io import atomic_write_text

MODES = ("grid", "coordinate")
# LMConfig fields that only an MoE layer reads: an axis over them is left out for a dense model
_MOE_ONLY = frozenset(
    {"router", "router_args", "expert_hidden", "num_shared_experts", "shared_gate", "capacity_factor",
     "capacity_priority", "dispatch", "moe_iterations", "experts", "experts_args", "first_k_dense", "moe_every"}
)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """'lr=1e-3,3e-3' -> ('lr', [0.001, 0.003]); values are JSON where they parse (numbers, true, null)."""
    key, sep, raw = text.partition("=")
    values = [parse_value(v.strip()) for v in raw.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise ValueError(f"a sweep axis is KEY=V1,V2,... (e.g. lr=1e-3,3e-3), got {text!r}")
    if len(set(map(json.dumps, values))) != len(values):
        raise ValueError(f"sweep axis {key.strip()!r} repeats a value: {values}")
    return key.strip(), values


def point_name(settings: dict[str, Any]) -> str:
    """A folder name for a point, keys sorted so that one point has one name whatever the axes' order:
    'ffn_out_mult=2,lr=0.003' (the base point, no settings: 'base')."""
    return ",".join(f"{k}={json.dumps(v)}".replace("/", "_").replace('"', "") for k, v in sorted(settings.items())) or (
        "base"
    )


def applies(model: LMConfig, key: str) -> bool:
    """Whether the axis `key` changes anything for `model`: MoE-only fields do nothing in a dense model."""
    field = key.removeprefix("model.").split(".")[0]
    return model.num_experts > 0 or field not in _MOE_ONLY


def configure(model: LMConfig, train_cfg: TrainConfig, settings: dict[str, Any]) -> tuple[LMConfig, TrainConfig]:
    """`model` and `train_cfg` with `settings` applied (the rules and errors of `moekit train --set`)."""
    pairs = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    out = apply_overrides({"model": model, "train": train_cfg}, pairs)
    return out["model"], out["train"]


@dataclass
class SweepResult:
    """What `tune` measured: every point's row and each model's best."""

    out: Path
    rows: list[dict[str, Any]]  # model, settings, run, final val loss (overall and per domain), steps
    best: dict[str, dict[str, Any]]  # model -> its best row


def _final(run_dir: Path) -> dict[str, Any]:
    rows = read_jsonl(run_dir / "eval.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}: a finished run without a validation row in eval.jsonl")
    return rows[-1]


def tune(
    models: dict[str, LMConfig],
    base_train: TrainConfig,
    train_data: TrainSource,
    windows: dict[str, tuple[Tensor, Tensor]],
    axes: list[tuple[str, list[Any]]],
    out: str | Path,
    *,
    mode: str = "coordinate",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Sweep `axes` for every model in `models` (name -> config), each trained with `base_train` on `train_data`
    and validated on `windows` (label -> (inputs, targets), `moekit.train.run.val_windows`).

    Raises ValueError for an unknown mode, an axis key no config has, or a value of the wrong type (before any
    training); KeyboardInterrupt when Ctrl-C stops a run (the same call continues it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not models:
        raise ValueError("tune needs at least one model")
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a sweep axis is named twice: {keys}")
    for cfg in models.values():  # every value of every axis is checked before the first run
        for key, values in axes:
            for v in values:
                if applies(cfg, key):
                    try:
                        configure(cfg, base_train, {key: v})
                    except ValueError as exc:
                        raise ValueError(str(exc).replace("--set ", "sweep axis ", 1)) from None
    out = Path(out)
    rows: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}

    def run(name: str, cfg: LMConfig, settings: dict[str, Any]) -> dict[str, Any]:
        done = next((r for r in rows if r["model"] == name and r["settings"] == settings), None)
        if done is not None:  # coordinate mode visits the current best again on the next axis
            return done
        model_cfg, train_cfg = configure(cfg, base_train, settings)
        run_dir = out / "runs" / name / point_name(settings)
        train_or_reuse(model_cfg, train_cfg, train_data, windows, run_dir, meta=meta, progress=progress, log=log,
                       label=f"{name} {point_name(settings)}")
        final = _final(run_dir)
        row = {"model": name, "settings": settings, "run": str(run_dir), "val_loss": final["loss"],
               "val_loss_per_domain": final.get("loss_per_label"), "steps": final["step"]}
        rows.append(row)
        return row

    for name, cfg in models.items():
        own = [(k, v) for k, v in axes if applies(cfg, k)]
        if mode == "grid":
            for combo in itertools.product(*[v for _, v in own]):
                run(name, cfg, dict(zip([k for k, _ in own], combo, strict=True)))
        else:
            current = {k: v[0] for k, v in own}
            for key, values in own:
                trials = [run(name, cfg, {**current, key: v}) for v in values]
                current = min(trials, key=_loss_key)["settings"]
        best[name] = min((r for r in rows if r["model"] == name), key=_loss_key)
    result = SweepResult(out, rows, best)
    _write(result, axes, mode, base_train)
    return result


def _loss_key(row: dict[str, Any]) -> float:
    loss = row["val_loss"]
    return loss if math.isfinite(loss) else math.inf  # a diverged point never wins


def _write(result: SweepResult, axes: list[tuple[str, list[Any]]], mode: str, base_train: TrainConfig) -> None:
    result.out.mkdir(parents=True, exist_ok=True)
    doc = {"mode": mode, "axes": [{"key": k, "values": v} for k, v in axes], "train": dataclasses.asdict(base_train),
           "rows": result.rows, "best": result.best}
    atomic_write_text(result.out / "sweep.json", json.dumps(doc, indent=2) + "\n")
    lines = [f"Sweep ({mode}) over {', '.join(k for k, _ in axes)}; {base_train.steps} steps of "
             f"{base_train.batch_size}x{base_train.seq_len} tokens, seed {base_train.seed}.", "",
             "| model | settings | final val loss | best |", "|---|---|---:|:---:|"]
    for r in result.rows:
        mark = "**best**" if result.best[r["model"]] is r else ""
        lines.append(f"| {r['model']} | {point_name(r['settings'])} | {r['val_loss']:.4f} | {mark} |")
    atomic_write_text(result.out / "sweep.md", "\n".join(lines) + "\n")
