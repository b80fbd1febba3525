"""`moekit tune`: sweep learning rate and scale multipliers per model, each model at its own best."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import Bf16OnCpuOpt, DeviceOpt, DtypeOpt, NoProgressOpt, ThreadsOpt, set_threads


def tune(
    models: Annotated[str, typer.Option(help="comma-separated model presets, e.g. ref-dense,ref-moe")],
    vary: Annotated[
        list[str], typer.Option(help="an axis KEY=V1,V2,... (repeatable): lr, ffn_out_mult, router_args.load_balance")
    ],
    out: Annotated[Path, typer.Option(help="output folder (sweep.md, sweep.json, runs/)")] = Path("runs/tune"),
    data: Annotated[str, typer.Option(help="'builtin' (the quickstart corpus) or 'reference' (the large one)")] = (
        "builtin"
    ),
    mode: Annotated[str, typer.Option(help="coordinate (one axis at a time) | grid (every combination)")] = (
        "coordinate"
    ),
    steps: Annotated[int, typer.Option(help="optimiser steps per point")] = 300,
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = 16,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence (default: the model's max_seq_len)")] = None,
    lr: Annotated[float, typer.Option(help="learning rate where no axis sets it")] = 3e-3,
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary (default: the data's own)")] = None,
    eval_windows: Annotated[int, typer.Option(help="validation windows per domain")] = 32,
    seed: Annotated[int, typer.Option(help="seed of init and data order (the data is seed 0's)")] = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    bf16_on_cpu: Bf16OnCpuOpt = False,
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train every model at every point of a small sweep; report each point's validation loss and each best."""
    import dataclasses

    from moekit.data import DataConfig, prepare_data
    from moekit.models.presets import preset
    from moekit.train.config import TrainConfig
    from moekit.train.device import resolve_device
    from moekit.train.run import check_fits, val_windows
    from moekit.train.tune import parse_axis
    from moekit.train.tune import tune as run_tune

    set_threads(threads)
    if data == "reference":
        from moekit.data import reference_data_config

        data_cfg = reference_data_config(seed=0)
    elif data == "builtin":
        data_cfg = DataConfig(vocab_size=vocab_size or 4096, seed=0)
    else:
        raise ValueError(f"--data must be 'builtin' or 'reference', got {data!r}")
    if vocab_size is not None:
        data_cfg = dataclasses.replace(data_cfg, vocab_size=vocab_size)
    axes = [parse_axis(v) for v in vary]
    names = [n.strip() for n in models.split(",") if n.strip()]
    cfgs = {n: preset(n, vocab_size=data_cfg.vocab_size) for n in names}
    length = seq_len or min(c.max_seq_len for c in cfgs.values())
    train_cfg = TrainConfig.short_run(
        steps, batch_size=batch_size, seq_len=length, lr=lr, eval_every=max(1, steps // 4), eval_windows=eval_windows,
        seed=seed, device=device, dtype=dtype, bf16_on_cpu=bf16_on_cpu,
    )
    resolve_device(device, dtype, bf16_on_cpu=bf16_on_cpu)
    prepared = prepare_data(data_cfg, progress=not no_progress)
    for cfg in cfgs.values():
        check_fits(cfg, train_cfg, prepared)
    windows = val_windows(prepared, train_cfg.seq_len, train_cfg.eval_windows)
    try:
        res = run_tune(
            cfgs, train_cfg, prepared.train, windows, axes, out, mode=mode, progress=not no_progress, log=typer.echo,
            meta={"data": dataclasses.asdict(data_cfg), "labels": list(prepared.label_names)},
        )
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the same command resumes from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    for name, row in res.best.items():
        typer.echo(f"{name}: best {row['settings']} (val loss {row['val_loss']:.4f})")
    typer.echo(f"sweep: {res.out / 'sweep.md'}")
