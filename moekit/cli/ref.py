"""`moekit ref`: the reference models. `build` trains them resumably into the cache, `list` shows what is
built, `export` writes one as a transformers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import DeviceOpt, DtypeOpt, NoProgressOpt, ThreadsOpt, set_threads

app = typer.Typer(help="Reference models: build (resumable), list, export.", no_args_is_help=True)


@app.command(name="build")
def build(
    budget: Annotated[str, typer.Option(help="smoke (seconds, tests) | ref (~40-60 min per model on 2 cores)")]
    = "ref",
    models: Annotated[
        str, typer.Option(help="comma-separated: ref-dense, ref-moe, ref-moe-fg, ref-dense-4x")
    ] = "ref-dense,ref-moe,ref-moe-fg",
    seed: Annotated[int, typer.Option(help="model init and batch order (the corpus is the same for every seed)")]
    = 0,
    out: Annotated[Path | None, typer.Option(help="also copy results.json and results.md into this folder")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = 0,
    no_progress: NoProgressOpt = False,
) -> None:
    """Train the reference models into the moekit cache (finished ones are reused, interrupted ones resume),
    then measure them and write results.json and results.md."""
    from moekit.ref import build as build_ref
    from moekit.ref.builder import budget_dir

    set_threads(threads)
    names = [n.strip() for n in models.split(",") if n.strip()]
    try:
        build_ref(names, budget, seed, progress=not no_progress, log=typer.echo, out=out, device=device, dtype=dtype)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; the same command resumes from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"results: {budget_dir(budget) / 'results.md'}" + (f" (copied to {out})" if out else ""))


@app.command(name="list")
def list_cmd() -> None:
    """What the cache holds: budget, model, seed, status (done, or partial at step N) and folder."""
    from moekit.ref import built

    rows = built()
    if not rows:
        typer.echo("no reference models built; run `moekit ref build --budget smoke` (seconds) or "
                   "`moekit ref build` (the reference budget)")
        return
    for r in rows:
        status = "done" if r["status"] == "done" else f"partial (step {r['step']}/{r['steps']})"
        typer.echo(f"{r['budget']:6s} {r['model']:13s} seed {r['seed']:<3d} {status:24s} {r['path']}")


@app.command(name="export")
def export(
    name: Annotated[str, typer.Argument(help="reference model: ref-moe (Mixtral) or ref-moe-fg")],
    to: Annotated[Path, typer.Option("--to", help="output folder of the transformers checkpoint")],
    budget: Annotated[str, typer.Option(help="budget the model was built under")] = "ref",
    seed: Annotated[int, typer.Option(help="seed the model was built with")] = 0,
    family: Annotated[str | None, typer.Option(help="transformers family (default: the model's own)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
) -> None:
    """Export a built reference model, with its tokenizer, as a transformers checkpoint with identical logits."""
    from moekit.ref import export_hf

    out = export_hf(name, to, budget, seed, family=family, overwrite=force)
    typer.echo(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained)")
