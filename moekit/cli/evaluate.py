"""`moekit eval`: validation loss of a trained run, overall and per domain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import ThreadsOpt, set_threads


def eval_cmd(
    run: Annotated[Path, typer.Argument(help="run directory written by `moekit train`")],
    windows: Annotated[
        int | None, typer.Option(help="validation windows per domain (default: the run's eval_windows)")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="window length (default: the run's training seq_len)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Evaluate RUN on the validation split of the data it was trained on; with the defaults this is the
    validation loss that training printed at its last step."""
    from moekit.train.evaluate import evaluate_run

    set_threads(threads)
    meta, res = evaluate_run(run, windows=windows, seq_len=seq_len)
    if as_json:
        typer.echo(json.dumps({"step": meta.get("step"), "loss": res.loss, "loss_per_label": res.loss_per_label}))
        return
    typer.echo(f"{run} (step {meta.get('step')}): validation loss {res.loss:.4f}")
    for label, loss in sorted(res.loss_per_label.items()):
        typer.echo(f"  {label:12s} {loss:.4f}  ({res.tokens_per_label[label]} tokens)")
