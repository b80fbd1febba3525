"""A training run end to end: prepare data, train, keep the tokenizer beside the checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moekit.data import DataConfig, PreparedData, prepare_data
from moekit.models import LMConfig
from moekit.train.checkpoint import has_checkpoint, read_meta
from moekit.train.config import TrainConfig
from moekit.train.device import resolve_device
from moekit.train.evaluate import validation_windows as val_windows  # the one definition of validation
from moekit.train.trainer import TrainResult, _diff, train


def check_fits(model_cfg: LMConfig, train_cfg: TrainConfig, data: PreparedData) -> None:
    """The model must cover the tokenizer's vocabulary and the training context."""
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(
            f"model vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {data.vocab_size}; "
            f"set vocab_size={data.vocab_size} (or a smaller data vocab_size)"
        )
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"train seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")


def _normalised(old: dict) -> dict:
    """A checkpoint's data config as DataConfig stores it today (relative paths of runs made before paths
    were stored absolute resolve from the working directory, as they did then); as written if it no
    longer builds (a field since removed, a tokenizer file gone), so the comparison names the difference."""
    try:
        return dataclasses.asdict(DataConfig(**old))
    except (TypeError, ValueError, OSError):
        return old


def run_training(
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    init: str | Path | None = None,
) -> TrainResult:
    """Prepare (or load cached) data, then train into `run_dir`.

    The tokenizer is copied into `run_dir` before the first step, so a run killed after its first
    checkpoint can already `generate`. `resume`, `overwrite` and `init` are those of `train`."""
    resolve_device(train_cfg.device, train_cfg.dtype, bf16_on_cpu=train_cfg.bf16_on_cpu)  # fail before the data
    data = prepare_data(data_cfg, progress=progress)
    check_fits(model_cfg, train_cfg, data)
    run_dir = Path(run_dir)
    if resume and has_checkpoint(run_dir):
        old = read_meta(run_dir).get("data")
        new = dataclasses.asdict(data_cfg)
        if old is not None and (old := _normalised(old)) != new:
            differences = "; ".join(_diff(old, new))
            raise ValueError(f"cannot resume: the data config differs from the checkpoint's: {differences}")
    return train(
        model_cfg,
        train_cfg,
        data.train,
        val_windows(data, train_cfg.seq_len, train_cfg.eval_windows),
        run_dir,
        resume=resume,
        overwrite=overwrite,
        stop_after=stop_after,
        progress=progress,
        meta={"data": dataclasses.asdict(data_cfg), "labels": list(data.label_names)},
        files={"tokenizer.json": data.directory / "tokenizer.json"},
        init=init,
    )
