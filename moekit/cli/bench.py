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
        str, typer.Option(help="smoke (seconds, CI) | small (~30 min on 2 cores) | medium (~2 h per seed on 2 cores)")
    ] = "smoke",
    routers: Annotated[
        str | None, typer.Option("--routers", help="comma-separated leaderboard entries (default: all)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder (leaderboard.md, .json, plots, runs/)")] = Path(
        "runs/leaderboard"
    ),
    seed: Annotated[int, typer.Option(help="model init and data order (same for every router)")] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(help="several seeds, e.g. 0,1,2: each entry trains once per seed on the first seed's data; "
                          "rows report mean and spread, claims are checked (overrides --seed)"),
    ] = None,
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
            typer.echo(f"budget {name}: {b.steps} steps, ~{b.minutes_2_cores:g} min per seed on 2 cores")
        return
    from moekit.bench.seeds import parse_seeds

    seed_list = parse_seeds(seeds) if seeds is not None else None  # bad input: one 'error:' line, exit 1
    set_threads(threads)
    names = [n.strip() for n in routers.split(",") if n.strip()] if routers else None
    try:
        res = run_leaderboard(
            budget, names, out, seed=seed, seeds=seed_list, device=device, dtype=dtype, bf16_on_cpu=bf16_on_cpu,
            progress=not no_progress, log=typer.echo,
        )
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the same command resumes from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    best = min(res.rows, key=lambda r: r["val_loss"])
    mean = " mean" if seed_list and len(seed_list) > 1 else ""
    typer.echo(f"best: {best['router']} (val loss{mean} {best['val_loss']:.3f}); leaderboard: "
               f"{res.out / 'leaderboard.md'}")
