"""`moekit adapt`: fine-tune a moekit run with a mixture of LoRA experts, or merge a plain LoRA back into its run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def adapt(
    method: Annotated[str | None, typer.Argument(help="method (see --list), or `merge`")] = None,
    base: Annotated[Path | None, typer.Argument(help="run directory (for `merge`: the adapter folder)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder to write")] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated linear names/suffixes, or re:<regex>")] = None,
    experts: Annotated[int | None, typer.Option(help="LoRA experts per layer (method default)")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (method default)")] = None,
    k: Annotated[int | None, typer.Option(help="experts (SMoRA: ranks) per token (method default)")] = None,
    steps: Annotated[int, typer.Option(help="training steps")] = 50,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="validation loss before/after")] = True,
    base_run: Annotated[Path | None, typer.Option("--base", help="`merge`: the base run (default: recorded)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the methods and exit")] = False,
) -> None:
    """Train METHOD's LoRA experts on BASE's data for --steps steps and write the adapters to --out
    (`moekit adapt merge ADAPTERS --out RUN` folds a plain LoRA into its base run)."""
    from moekit.adapt.methods import list_methods

    if list_:
        for name, desc in list_methods().items():
            typer.echo(f"{name:12s} {desc}")
        return
    if method is None or base is None or out is None:
        raise ValueError("adapt: give METHOD RUN --out DIR, `merge ADAPTERS --out RUN`, or --list")
    if method == "merge":
        from moekit.adapt.run import merge_run

        typer.echo(f"wrote {merge_run(base, out, base=base_run, force=force)}")
        return
    from moekit.adapt.run import adapt_run

    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    report = adapt_run(method, base, out, targets=names, num_experts=experts, rank=rank, k=k, steps=steps, lr=lr,
                       evaluate=evaluate, force=force)
    typer.echo(report.table())
    typer.echo(f"wrote {out}")
