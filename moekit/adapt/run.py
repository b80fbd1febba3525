"""Fine-tune a moekit run with a mixture of LoRA experts (what `moekit adapt` does), and merge a plain LoRA back.

`adapt_run` loads the run's model, attaches METHOD's adapters, trains them a few steps on the run's own data (the
built-in corpus domains), and writes OUT: `adapt_config.json` + `adapters.safetensors` (`save_adapters`), and
`adapt_report.json` (the base run, per-domain validation loss before/after, trainable parameters, tokens/s).
A plain LoRA folder also gets peft's files. `merge_run` folds a plain LoRA into the base and writes a run folder
`moekit eval` reads. Folders are written beside OUT and renamed into place: a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moekit.adapt.io import load_adapters, save_adapters, save_peft
from moekit.adapt.methods import method_config
from moekit.adapt.model import adapted_layers, attach, check_trainable, merge_and_unload
from moekit.adapt.trainer import finetune
from moekit.utils.io import atomic_write_text, replace_dir

REPORT = "adapt_report.json"


@dataclass
class AdaptReport:
    """What `adapt_run` measured."""

    method: str
    base: str  # the base run folder
    trainable: int  # trainable parameters (adapters and routers)
    total: int  # all parameters of the adapted model
    steps: int
    train_tokens_per_s: float
    loss_before: dict[str, float] = field(default_factory=dict)  # validation loss per domain ("all": overall)
    loss_after: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{self.method}: {self.trainable:,d} trainable of {self.total:,d} parameters, {self.steps} steps, "
                 f"{self.train_tokens_per_s:,.0f} train tokens/s"]
        for k in self.loss_before:
            lines.append(f"loss {k:16s} {self.loss_before[k]:8.4f} -> {self.loss_after.get(k, float('nan')):8.4f}")
        return "\n".join(lines)


def _losses(model, windows: dict, batch_size: int) -> dict[str, float]:
    from moekit.train.evaluate import evaluate

    r = evaluate(model, windows, batch_size=batch_size)
    return {"all": r.loss, **r.loss_per_label}


def _in_new_dir(out: Path, force: bool, write) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-adapt-"))
    try:
        write(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapt_run(method: str, base: str | Path, out: str | Path, *, targets: list[str] | None = None,
              num_experts: int | None = None, rank: int | None = None, k: int | None = None, steps: int = 50,
              lr: float = 1e-3, batch_size: int | None = None, seq_len: int | None = None, evaluate: bool = True,
              force: bool = False, seed: int = 0) -> AdaptReport:
    """Fine-tune METHOD's adapters on the base run's data for `steps` steps and write them to `out`."""
    import torch

    from moekit.data import DataConfig, prepare_data
    from moekit.train.checkpoint import checkpoint_dir, load_model, read_meta
    from moekit.train.evaluate import validation_windows

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    config = method_config(method, targets=targets, num_experts=num_experts, rank=rank, k=k)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    ckpt = checkpoint_dir(base)
    meta = read_meta(ckpt)
    train, data_cfg = meta.get("train"), meta.get("data")
    if not isinstance(train, dict) or not isinstance(data_cfg, dict):
        raise ValueError(f"{ckpt / 'config.json'}: no train or data config (not a training run)")
    torch.manual_seed(seed)
    model = attach(load_model(ckpt), config)
    trainable = check_trainable(model)
    data = prepare_data(DataConfig(**data_cfg), progress=False)
    seq_len = seq_len or train["seq_len"]
    batch_size = batch_size or train["batch_size"]
    windows = validation_windows(data, train["seq_len"], train["eval_windows"]) if evaluate else None
    before = _losses(model, windows, train["batch_size"]) if windows is not None else {}
    t0 = time.perf_counter()
    finetune(model, data.train, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed)
    tps = steps * batch_size * seq_len / max(time.perf_counter() - t0, 1e-9)
    after = _losses(model, windows, train["batch_size"]) if windows is not None else {}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = AdaptReport(method, str(Path(base).resolve()), trainable, total, steps, tps, before, after)
    plain = all(layer.mergeable for _, layer in adapted_layers(model))

    def write(tmp: Path) -> None:
        save_adapters(model, tmp)
        if plain:
            save_peft(model, tmp)
        atomic_write_text(tmp / REPORT, json.dumps(asdict(report), indent=2) + "\n")

    _in_new_dir(out, force, write)
    return report


def merge_run(adapters: str | Path, out: str | Path, *, base: str | Path | None = None, force: bool = False) -> Path:
    """Fold the plain LoRA in `adapters` into its base run (recorded in its report, or `base`) and write the merged
    model as a run folder `out` (config.json keeps the base's train and data configs)."""
    from moekit.train.checkpoint import CKPT, checkpoint_dir, load_model, read_meta, save_checkpoint

    adapters = Path(adapters)
    if base is None:
        f = adapters / REPORT
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file; give the base run with --base")
        base = json.loads(f.read_text(encoding="utf-8"))["base"]
    ckpt = checkpoint_dir(base)
    run_dir = ckpt.parent if ckpt.name == CKPT else ckpt
    meta = read_meta(ckpt)
    model = merge_and_unload(load_adapters(load_model(ckpt), adapters))
    for p in model.parameters():
        p.requires_grad_(True)
    new_meta = {k: v for k, v in meta.items() if k != "model"}
    new_meta["adapt"] = [*meta.get("adapt", []), {"merged": str(adapters.resolve()), "source": str(run_dir)}]

    def write(tmp: Path) -> None:
        save_checkpoint(tmp, model, new_meta)
        tokenizer = run_dir / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copy2(tokenizer, tmp / "tokenizer.json")

    _in_new_dir(Path(out), force, write)
    return Path(out)
