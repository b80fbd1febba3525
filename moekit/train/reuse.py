"""Train a run, or reuse it: the one rule every comparison (leaderboard, sweep, reference models) follows.

A run folder that holds a finished run of the same model and training config is reused as it is; one that
holds an interrupted run of them is resumed (moekit's resume is exact, so the result is the one an
uninterrupted run gives); one that holds another model or training config is refused, never overwritten.
The device is left out of the comparison (`same_run`): the same float32 math on a CPU or a GPU is the same run
up to rounding. The dtype counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.models import LMConfig
from moekit.train.checkpoint import has_checkpoint, read_meta
from moekit.train.config import TrainConfig
from moekit.train.trainer import TrainSource, _diff, train

PLACEMENT = ("device", "bf16_on_cpu")  # TrainConfig fields that say where a run trains, not what it computes


def same_run(old_train: dict[str, Any], train_cfg: TrainConfig) -> bool:
    """Whether a run saved with the train config `old_train` (its meta's, fields added since at their defaults)
    is the run `train_cfg` asks for. The device is left out: the same float32 math on a CPU or a GPU is the same
    run up to rounding, so a finished CPU run serves a --device cuda request and vice versa. The dtype counts:
    a bfloat16 run is another measurement than a float32 one."""
    old = TrainConfig.from_dict(old_train)
    return dataclasses.replace(old, **{f: getattr(train_cfg, f) for f in PLACEMENT}) == train_cfg


def run_state(
    run_dir: Path, model_cfg: LMConfig, train_cfg: TrainConfig, *, data: dict[str, Any] | None = None
) -> str:
    """"new" (no checkpoint), "partial" (an interrupted run of this config), "done" (finished: its step is
    train_cfg.steps). Raises FileExistsError, naming what differs, when the folder holds a run of another model
    or train config, or of another data config where it names a key of `data` (DataConfig fields that must match;
    a key the saved run lacks, from before the field existed, matches)."""
    if not has_checkpoint(run_dir):
        return "new"
    old = read_meta(run_dir)
    # fields added to the configs since the run was saved fill in their defaults
    saved_model, saved_train = LMConfig.from_dict(old["model"]), TrainConfig.from_dict(old["train"])
    differs = [f"model {d}" for d in _diff(saved_model.to_dict(), model_cfg.to_dict())]
    if not same_run(old["train"], train_cfg):
        differs += [f"train {d}" for d in _diff(saved_train.to_dict(), train_cfg.to_dict()) if d.split(":")[0]
                    not in PLACEMENT]
    saved_data = old.get("data", {})
    differs += [f"data {k}: checkpoint {saved_data[k]!r} vs requested {v!r}" for k, v in (data or {}).items()
                if k in saved_data and saved_data[k] != v]
    if differs:
        raise FileExistsError(
            f"{run_dir} holds a run of another model, training or data config ({'; '.join(differs)}); remove it or "
            "choose another output folder"
        )
    return "done" if old.get("step") == train_cfg.steps else "partial"


def train_or_reuse(
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    train_data: TrainSource,
    val_windows: dict[str, tuple[Tensor, Tensor]],
    run_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    label: str = "",
    data: dict[str, Any] | None = None,
) -> bool:
    """Train `run_dir` to `train_cfg.steps`, resuming an interrupted run and reusing a finished one.

    Returns True when it trained (fresh or resumed), False when the finished run was reused.
    Raises KeyboardInterrupt when Ctrl-C/SIGTERM stopped the training (the checkpoint is written: the same call
    resumes it), so a caller never ranks half a run; FileExistsError for a folder holding another run."""
    run_dir = Path(run_dir)
    state = run_state(run_dir, model_cfg, train_cfg, data=data)
    if state == "done":
        return False
    resuming = f" (resuming from step {read_meta(run_dir).get('step')})" if state == "partial" else ""
    log(f"{label or run_dir}: training {train_cfg.steps} steps{resuming}")
    res = train(
        model_cfg, train_cfg, train_data, val_windows, run_dir, resume=state == "partial", meta=meta, files=files,
        progress=progress,
    )
    if res.interrupted:
        raise KeyboardInterrupt
    return True
