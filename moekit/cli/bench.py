"""`moekit bench`: benchmarks. `moekit bench routers` trains the LM with every router and ranks them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import Bf16OnCpuOpt, DeviceOpt, DtypeOpt, NoProgressOpt, ThreadsOpt, set_threads

app = typer.Typer(help="Benchmarks: the router leaderboard.", no_args_is_help=True)


@app.command(name="routers")
def routers(
    budget: Annotated[
        str, typer.Option(help="smoke (seconds, CI) | small (~30 min on 2 cores) | medium (hours)")
    ] = "smoke",
    routers: Annotated[
        str | None, typer.Option("--routers", help="comma-separated leaderboard entries (default: all)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder (leaderboard.md, .json, plots, runs/)")] = Path(
        "runs/leaderboard"
    ),
    seed: Annotated[int, typer.Option(help="model init and data order (same for every router)")] = 0,
    list_entries: Annotated[bool, typer.Option("--list", help="list the entries and budgets, then exit")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    bf16_on_cpu: Bf16OnCpuOpt = False,
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train moekit's LM with each router at equal steps, seed and active FLOPs; write a leaderboard."""
    from moekit.bench import BUDGETS, ENTRIES, run_leaderboard

    if list_entries:
        for name, e in ENTRIES.items():
            typer.echo(f"{name:20s} {e.router or '(dense)'} {e.router_args} {e.note}")
        for name, b in BUDGETS.items():
            typer.echo(f"budget {name}: {b.steps} steps, ~{b.minutes_2_cores:g} min on 2 cores")
        return
    set_threads(threads)
    names = [n.strip() for n in routers.split(",") if n.strip()] if routers else None
    try:
        res = run_leaderboard(
            budget, names, out, seed=seed, device=device, dtype=dtype, bf16_on_cpu=bf16_on_cpu,
            progress=not no_progress, log=typer.echo,
        )
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the same command resumes from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    best = min(res.rows, key=lambda r: r["val_loss"])
    typer.echo(f"best: {best['router']} (val loss {best['val_loss']:.3f}); leaderboard: {res.out / 'leaderboard.md'}")
