"""`moekit train`: train a dense or MoE LM on the built-in corpus or your files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import (
    Bf16OnCpuOpt,
    DeviceOpt,
    DtypeOpt,
    NoProgressOpt,
    SetOpt,
    ThreadsOpt,
    set_threads,
)


def train(
    out: Annotated[Path, typer.Option(help="run directory (checkpoint, logs, tokenizer)")],
    preset: Annotated[
        str, typer.Option(help="model preset: micro-dense, micro-moe, tiny-dense, tiny-moe")
    ] = "tiny-moe",
    data: Annotated[list[str] | None, typer.Option(help="'builtin' or .txt/.jsonl/.parquet files or folders")] = None,
    label_field: Annotated[str | None, typer.Option(help="JSONL/Parquet field holding a label (domain)")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 200,
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = 16,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence (default: the model's max_seq_len)")] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 3e-3,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary trained on the data")] = 4096,
    seed: Annotated[int, typer.Option(help="seed of init and data order")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the checkpoint in OUT")] = False,
    init: Annotated[
        Path | None,
        typer.Option(help="start from this checkpoint's weights and model config (e.g. `moekit convert` output; "
                     "fresh optimiser and schedule; its data config unless --data is given)"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="delete the checkpoint and logs in OUT and start over")
    ] = False,
    stop_after: Annotated[
        int | None, typer.Option(help="stop this invocation after N total steps (resume later)")
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    bf16_on_cpu: Bf16OnCpuOpt = False,
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train an LM; Ctrl-C or SIGTERM writes a checkpoint and exits 130, --resume continues it exactly."""
    from moekit.data import DataConfig
    from moekit.models.presets import preset as get_preset
    from moekit.train import TrainConfig
    from moekit.train.checkpoint import has_checkpoint
    from moekit.train.overrides import apply_overrides
    from moekit.train.run import run_training
    from moekit.utils.cleanup import undo_on_failure

    set_threads(threads)
    spec = data if data and data != ["builtin"] else "builtin"
    init_data = None
    if init is not None:  # the model (and, without --data, the data) of the checkpoint
        from moekit.train.checkpoint import read_meta, read_model_config

        model_cfg = read_model_config(init)
        init_data = read_meta(init).get("data") if not data else None
    else:
        model_cfg = get_preset(preset, vocab_size=vocab_size)
    train_cfg = TrainConfig(
        steps=steps, batch_size=batch_size, seq_len=seq_len or model_cfg.max_seq_len, lr=lr, seed=seed,
        device=device, dtype=dtype, bf16_on_cpu=bf16_on_cpu,
    )
    if isinstance(init_data, dict):
        data_cfg = DataConfig(**init_data)
    else:
        data_cfg = DataConfig(spec=spec, vocab_size=vocab_size, seed=seed, label_field=label_field)
    cfgs = apply_overrides({"model": model_cfg, "train": train_cfg, "data": data_cfg}, set_ or [])
    # a failed run leaves no empty run folder and no temporary checkpoint; a written checkpoint (also one
    # left at checkpoint.old by a failed swap) keeps the run folder as it is, for --resume
    try:
        with undo_on_failure(out, keep=lambda _: has_checkpoint(out)):
            result = run_training(
                cfgs["model"],
                cfgs["train"],
                cfgs["data"],
                out,
                resume=resume,
                overwrite=overwrite,
                stop_after=stop_after,
                progress=not no_progress,
                init=init,
            )
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: aborted without a new checkpoint
        typer.echo(f"error: aborted; {Path(out) / 'checkpoint'} keeps the last checkpoint written (if any)", err=True)
        raise typer.Exit(130) from None
    ev = result.final_eval
    status = "interrupted at" if result.interrupted else "finished at"
    typer.echo(f"{status} step {result.step}; checkpoint in {Path(out) / 'checkpoint'}")
    if ev is not None:
        typer.echo(
            f"validation loss {ev.loss:.4f}  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(ev.loss_per_label.items()))
        )
    if result.interrupted:
        raise typer.Exit(130)
