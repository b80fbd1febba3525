"""Short fine-tuning of a compressed moekit run with moekit's trainer (`moekit.train.train`), written as a new run
folder: what distillation (`moekit.compress.distill`) and quantization-aware training (`moekit.compress.qat`)
share.

The run is trained in a temporary folder beside DST (starting from SRC's weights: `train(init=...)`, a fresh
optimiser and schedule, on SRC's data config) and renamed into place only when whole: a failure leaves nothing
behind, an existing DST is refused unless `force`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.models import LMConfig
from moekit.train.config import TrainConfig
from moekit.train.trainer import ExtraLoss, TrainResult


@dataclass(frozen=True)
class FinetuneConfig:
    """How long and how fast to fine-tune (the rest of the training setup comes from the source run)."""

    steps: int = 100  # optimiser steps
    lr: float = 3e-4  # peak learning rate (warmup over 5% of the steps, then cosine to 10%)
    batch_size: int | None = None  # sequences per step (None: the source run's)
    seq_len: int | None = None  # tokens per sequence (None: the source run's)
    seed: int = 0  # data order and random routing draws

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"FinetuneConfig.steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"FinetuneConfig.lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "seq_len"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"FinetuneConfig.{name} must be an integer >= 1 or None, got {v!r}")

    def train_config(self, source: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of the fine-tuning, from the source run's train config `source`."""
        return TrainConfig.short_run(
            self.steps, lr=self.lr, batch_size=self.batch_size or source.get("batch_size", 16),
            seq_len=self.seq_len or source.get("seq_len", 128), eval_every=self.steps,
            eval_windows=source.get("eval_windows", 16), log_every=max(1, min(10, self.steps)), seed=self.seed,
        )


def finetune_run(
    src: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    *,
    record: dict[str, Any],
    model_cfg: LMConfig | None = None,
    extra_loss: ExtraLoss | None = None,
    finish: Callable[[Path], None] | None = None,
    force: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Fine-tune the model of run `src` (a run folder or checkpoint) into the run folder `out`.

    model_cfg: the model to train (default: `src`'s); its tensors must fit `src`'s weights (e.g. an experts
        variant with the same parameters, `moekit.compress.qat`).
    record: appended to the checkpoint's "compress" list (method, teacher, steps, ...).
    extra_loss: a term added to the loss (`moekit.train.train`), e.g. distillation from a teacher.
    finish(tmp_run): called on the trained run folder before it is renamed into place (e.g. to rewrite the
        checkpoint with plain experts).
    """
    from moekit.data import DataConfig, prepare_data
    from moekit.train.checkpoint import CKPT, checkpoint_dir, read_meta
    from moekit.train.evaluate import validation_windows
    from moekit.train.run import check_fits
    from moekit.train.trainer import train
    from moekit.utils.io import replace_dir

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    ckpt = checkpoint_dir(src)
    run_dir = ckpt.parent if ckpt.name == CKPT else ckpt
    meta = read_meta(ckpt)
    train_src, data_cfg = meta.get("train"), meta.get("data")
    if not isinstance(train_src, dict) or not isinstance(data_cfg, dict):
        raise ValueError(f"{ckpt / 'config.json'}: no train or data config (not a training run)")
    model_cfg = model_cfg or LMConfig.from_dict(meta["model"])
    train_cfg = cfg.train_config(train_src)
    data = prepare_data(DataConfig(**data_cfg), progress=False)
    check_fits(model_cfg, train_cfg, data)
    new_meta = {"data": data_cfg, "labels": list(data.label_names),
                "compress": [*meta.get("compress", []), {**record, "source": str(run_dir)}]}
    files = {"tokenizer.json": run_dir / "tokenizer.json"} if (run_dir / "tokenizer.json").is_file() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-finetune-"))
    try:
        result = train(model_cfg, train_cfg, data.train, validation_windows(data, train_cfg.seq_len,
                       train_cfg.eval_windows), tmp, meta=new_meta, files=files, progress=progress, init=ckpt,
                       extra_loss=extra_loss)
        if result.interrupted:
            raise KeyboardInterrupt(f"fine-tuning into {out} was interrupted; nothing was written")
        if finish is not None:
            finish(tmp)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(result, run_dir=out)
