"""`moekit analyze`: trace a model's routing over labelled data; write metrics and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import NoProgressOpt, ThreadsOpt, set_threads


def analyze(
    path: Annotated[Path, typer.Argument(help="a moekit run directory or a Hugging Face checkpoint directory")],
    out: Annotated[Path, typer.Option(help="output folder (trace.parquet, metrics.json, report.html, PNGs)")],
    data: Annotated[
        list[str] | None, typer.Option(help="'builtin' (the run's validation split) or files/folders")
    ] = None,
    windows: Annotated[int, typer.Option(help="token windows per label")] = 64,
    seq_len: Annotated[int | None, typer.Option(help="window length (default: the run's training seq_len)")] = None,
    behaviour: Annotated[str | None, typer.Option(help="COLUMN:A:B - experts linked to label A vs B")] = None,
    no_outputs: Annotated[
        bool, typer.Option("--no-outputs", help="skip expert outputs (no super-expert analysis)")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing report in OUT")] = False,
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Trace PATH's routing and report load, specialisation, affinity, SRP/SCH and super experts."""
    from moekit.analyze.run import analyze_run
    from moekit.utils.cleanup import undo_on_failure

    set_threads(threads)
    beh = None
    if behaviour:
        parts = behaviour.split(":")
        if len(parts) != 3:
            raise typer.BadParameter(f"expected COLUMN:A:B, got {behaviour!r}", param_hint="--behaviour")
        beh = (parts[0], parts[1], parts[2])
    if (out / "report.html").exists() and not overwrite:
        raise FileExistsError(f"{out / 'report.html'} exists; pass --overwrite or choose another --out")
    with undo_on_failure(out):  # a failed analysis leaves none of its files (no lone trace.parquet)
        report = analyze_run(
            path,
            out,
            data=data or "builtin",
            seq_len=seq_len,
            windows_per_label=windows,
            record_outputs=not no_outputs,
            behaviour=beh,
            progress=not no_progress,
        )
    typer.echo(f"wrote {report} and {out / 'metrics.json'}")
