"""Compress a moekit run folder into a new run folder (what `moekit compress` does), by any method of
`moekit.compress.methods` (pruning, MC-SMoE merging, SVD decomposition).

The new folder holds `checkpoint/` (the compressed model; config.json keeps the source's train and data configs,
so `moekit eval DST` evaluates it on the same validation windows, plus a "compress" record) and the
source's `tokenizer.json`. It is written to a temporary folder beside DST and renamed into place: a failure
leaves nothing behind, and an existing DST is refused unless `force`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moekit.compress.calibrate import calibrate, calibration_batches, moe_layers
from moekit.compress.methods import CompressOptions, get_compressor
from moekit.utils.io import replace_dir


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters of the MoE layers: routers, routed and shared experts), each tensor once."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    moe = {id(p): p for _, layer in moe_layers(model) for p in layer.parameters()}
    return total, sum(p.numel() for p in moe.values())


def validation_losses(model: nn.Module, windows: dict, batch_size: int) -> dict[str, float]:
    """Validation loss overall ("all", token-weighted) and per label, labels sorted (moekit.train.evaluate)."""
    from moekit.train.evaluate import evaluate

    res = evaluate(model, windows, batch_size=batch_size)
    return {"all": res.loss, **dict(sorted(res.loss_per_label.items()))}


@dataclass
class CompressReport:
    """Before/after numbers of one compression."""

    result: Any  # PruneResult, MergeResult or DecomposeResult: has lines() and record()
    params: tuple[int, int]  # before: total, MoE
    params_after: tuple[int, int]
    loss: dict[str, float] = field(default_factory=dict)  # label (and "all") -> validation loss before
    loss_after: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = list(self.result.lines())
        lines.append(f"{'':20s} {'before':>12s} {'after':>12s}")
        for label in self.loss:
            lines.append(f"{'loss ' + label:20s} {self.loss[label]:12.4f} {self.loss_after[label]:12.4f}")
        lines.append(f"{'params total':20s} {self.params[0]:12,d} {self.params_after[0]:12,d}")
        lines.append(f"{'params MoE':20s} {self.params[1]:12,d} {self.params_after[1]:12,d}")
        return "\n".join(lines)


def compress_run(method: str, run: str | Path, out: str | Path, *, ratio: float | None = None,
                 rank: int | None = None, sparsity: float = 0.0, calib_batches: int = 16,
                 calib_seq_len: int | None = None, calib_batch_size: int = 8, protect_super_experts: bool = True,
                 evaluate: bool = True, force: bool = False, seed: int = 0, budget: str = "uniform") -> CompressReport:
    """Compress the model of `run` with `method` (`moekit.compress.methods.list_compressors()`) and write the
    result as the run folder `out`; see the module docstring.

    Args:
        ratio: fraction removed: of the experts per layer (pruning, mcsmoe; default 0.25) or of the routed
            expert parameters (svd, when no `rank`).
        rank: svd: the rank of every layer's deltas; mcsmoe: the rank of its low-rank + sparse step (None: none).
        sparsity: mcsmoe: fraction of the low-rank residual's entries zeroed in that step.
        calib_batches, calib_seq_len, calib_batch_size, seed: the calibration windows of the run's train split
            (methods that calibrate).
        budget: pruning: "uniform" (the ratio of every layer) or "adaptive" (the same total, layer-adaptive).
    """
    from moekit.data import DataConfig, prepare_data
    from moekit.train.checkpoint import CKPT, checkpoint_dir, load_model, read_meta, save_checkpoint
    from moekit.train.evaluate import validation_windows

    spec = get_compressor(method)  # unknown names fail before anything is read
    opts = CompressOptions(ratio=ratio, rank=rank, sparsity=sparsity, protect_super_experts=protect_super_experts,
                           budget=budget)
    if calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {calib_batches}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    ckpt = checkpoint_dir(run)
    run_dir = ckpt.parent if ckpt.name == CKPT else ckpt
    meta = read_meta(ckpt)
    model = load_model(ckpt)
    if not moe_layers(model):
        raise ValueError(f"{run}: the model is dense (num_experts=0); there are no experts to compress")
    spec.check(model, opts)  # bad options fail before data is prepared
    train, data_cfg = meta.get("train"), meta.get("data")
    if not isinstance(train, dict) or not isinstance(data_cfg, dict):
        raise ValueError(f"{ckpt / 'config.json'}: no train or data config (not a training run)")
    data = prepare_data(DataConfig(**data_cfg), progress=False)
    seq_len = calib_seq_len or train["seq_len"]
    cal = None
    if spec.calibrated:
        cal = calibrate(model, calibration_batches(data, calib_batches, seq_len, batch_size=calib_batch_size,
                                                   seed=seed), seed=seed)
    windows = validation_windows(data, train["seq_len"], train["eval_windows"]) if evaluate else None
    before = param_counts(model)
    loss = validation_losses(model, windows, train["batch_size"]) if windows is not None else {}
    result = spec.apply(model, cal, opts)
    report = CompressReport(result, before, param_counts(model), loss)
    if windows is not None:
        report.loss_after = validation_losses(model, windows, train["batch_size"])
    record = {**result.record(), "source": str(run_dir)}
    if spec.calibrated:
        record.update(calib_batches=calib_batches, calib_seq_len=seq_len)
    new_meta = {k: v for k, v in meta.items() if k != "model"}
    new_meta["compress"] = [*meta.get("compress", []), record]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-compress-"))
    try:
        save_checkpoint(tmp, model, new_meta)
        tokenizer = run_dir / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        replace_dir(tmp, out)  # an existing DST (--force) is swapped out only once the new one is whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
