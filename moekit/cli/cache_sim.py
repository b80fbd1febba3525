"""`moekit cache-sim`: expert-cache hit rates (LRU, LFU, with prefetch, Belady, SCH) over a routing trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def cache_sim(
    trace: Annotated[Path, typer.Argument(help="trace.parquet written by `moekit analyze`")],
    multiples: Annotated[str, typer.Option(help="cache sizes per layer: multiples m of k, comma separated")] = "1,2,4",
    segment_length: Annotated[int, typer.Option(help="segment length L of the SCH column")] = 16,
    no_prefetch: Annotated[bool, typer.Option("--no-prefetch", help="skip the prefetch columns")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the full result (per layer) as JSON here")] = None,
) -> None:
    """Size an expert cache before serving: replay TRACE through caches of m x k experts per layer."""
    from moekit.infer.simulate import cache_simulation, format_table
    from moekit.utils.io import atomic_write_text

    try:
        ms = [int(m) for m in multiples.split(",") if m.strip()]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise typer.BadParameter(f"expected integers >= 1 like '1,2,4', got {multiples!r}", param_hint="--multiples")
    if segment_length < 1:
        raise typer.BadParameter(f"must be >= 1, got {segment_length}", param_hint="--segment-length")
    sim = cache_simulation(trace, multiples=ms, prefetch=not no_prefetch, segment_length=segment_length)
    typer.echo(format_table(sim))
    if out is not None:
        atomic_write_text(out, json.dumps(sim, indent=1))
        typer.echo(f"wrote {out}")
