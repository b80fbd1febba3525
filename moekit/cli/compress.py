"""`moekit compress`: prune, merge (MC-SMoE) or decompose (SVD) the experts of a trained moekit run into a new
run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def compress(
    method: Annotated[str | None, typer.Argument(help="compression method (see --list)")] = None,
    run: Annotated[Path | None, typer.Argument(help="run directory written by `moekit train`")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="new run directory to write")] = None,
    ratio: Annotated[float | None, typer.Option(
        help="fraction removed, in (0, 1): of the experts per MoE layer (pruning, mcsmoe; default 0.25) or of the "
             "routed expert parameters (svd, unless --rank)")] = None,
    rank: Annotated[int | None, typer.Option(
        help="svd: rank of every layer's expert deltas; mcsmoe: rank of the low-rank + sparse step after merging")
    ] = None,
    sparsity: Annotated[float, typer.Option(
        help="mcsmoe with --rank: fraction of the low-rank residual's entries zeroed, in [0, 1]")] = 0.0,
    calib_batches: Annotated[int, typer.Option(help="calibration batches from the run's train split")] = 16,
    calib_seq_len: Annotated[int | None, typer.Option(help="calibration window (default: the run's seq_len)")] = None,
    protect_super: Annotated[bool, typer.Option("--protect-super/--no-protect-super",
                                                help="keep super experts (the analyze rule)")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="print validation loss before/after")] = True,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out directory")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the methods and exit")] = False,
) -> None:
    """Compress the experts of every MoE layer of RUN with METHOD (prune, merge or decompose) and write the result
    to --out as a run folder (`moekit eval OUT` reads it), with a before/after table."""
    from moekit.compress.methods import list_compressors

    if list_:
        for name, desc in list_compressors().items():
            typer.echo(f"{name:10s} {desc}")
        return
    if method is None or run is None or out is None:
        raise ValueError("compress: give METHOD RUN --out DST (or --list)")
    from moekit.compress.run import compress_run

    report = compress_run(method, run, out, ratio=ratio, rank=rank, sparsity=sparsity, calib_batches=calib_batches,
                          calib_seq_len=calib_seq_len, protect_super_experts=protect_super, evaluate=evaluate,
                          force=force)
    typer.echo(report.table())
    typer.echo(f"wrote {out}")
