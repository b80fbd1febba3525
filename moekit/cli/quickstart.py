"""`moekit quickstart`: dense vs MoE on the built-in corpus, with a report (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import NoProgressOpt, ThreadsOpt, set_threads


def quickstart(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/quickstart"),
    steps: Annotated[
        int, typer.Option(help="training steps per model; on an existing OUT, continues its runs to this many")
    ] = 250,
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train a dense and an MoE LM with equal active parameters; compare them and show expert specialisation."""
    from rich.console import Console
    from rich.table import Table

    from moekit.train.checkpoint import has_checkpoint
    from moekit.train.quickstart import QuickstartConfig
    from moekit.train.quickstart import quickstart as run_quickstart
    from moekit.utils.cleanup import undo_on_failure

    set_threads(threads)
    console = Console()
    try:
        with undo_on_failure(out, keep=has_checkpoint):
            res = run_quickstart(
                QuickstartConfig(out=str(out), steps=steps), progress=not no_progress, log=console.print
            )
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the same command resumes from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    labels = sorted(res.evals["dense"].loss_per_label)
    table = Table(title=f"validation loss after {steps} steps (nats/token, lower is better)")
    for col in ("model", "active params", "overall", *labels):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in ("dense", "moe"):
        e = res.evals[name]
        table.add_row(
            name,
            f"{res.params[name]['active'] / 1e6:.2f}M",
            f"{e.loss:.3f}",
            *(f"{e.loss_per_label[label]:.3f}" for label in labels),
        )
    console.print(table)
    moe = res.evals["moe"]
    console.print("[bold]expert load per layer[/] (share of validation token-slots)")
    for i, layer in enumerate(moe.moe_layers):
        total = [
            sum(moe.expert_counts[label][i][e] for label in labels) for e in range(len(moe.expert_counts[labels[0]][i]))
        ]
        s = sum(total) or 1
        console.print(f"  layer {layer}: " + " ".join(f"{t / s:.2f}" for t in total))
    console.print("[bold]experts that specialise[/] (lift = domain share / overall share)")
    for label in labels:
        best = max(
            ((i, e, lift) for i, layer in enumerate(res.specialists[label]) for e, lift in layer), key=lambda t: t[2]
        )
        console.print(f"  {label:6s} strongest: layer {moe.moe_layers[best[0]]} expert {best[1]} (x{best[2]:.2f})")
    console.print(f"[bold]sample[/] (MoE model): {res.sample!r}")
    console.print(f"report: {res.report}")
