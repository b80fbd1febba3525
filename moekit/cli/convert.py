"""`moekit convert`: turn a dense model (moekit run or transformers Llama/Qwen folder) into an MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert(
    method: Annotated[str | None, typer.Argument(help="conversion method (see --list)")] = None,
    src: Annotated[Path | None, typer.Argument(help="dense moekit run/checkpoint, or a transformers folder")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="new folder to write")] = None,
    experts: Annotated[int, typer.Option(help="experts per MoE block (upcycle: copies, E)")] = 8,
    k: Annotated[int, typer.Option(help="experts (upcycle: copies) each token uses")] = 2,
    granularity: Annotated[int, typer.Option(help="upcycle: cut each copy into G slices (E*G experts, k*G active)")
                           ] = 1,
    router_std: Annotated[float, typer.Option(help="upcycle: std of the new router rows (0: zero router)")] = 0.02,
    noise: Annotated[float, typer.Option(help="upcycle: relative std of noise added to each copy")] = 0.0,
    reinit: Annotated[float, typer.Option(help="upcycle: fraction of each expert's neurons re-initialised")] = 0.0,
    cluster: Annotated[str, typer.Option(help="split: cluster neurons on 'activations' or 'weights'")] = "activations",
    router_steps: Annotated[int, typer.Option(help="split: router training steps per block (0: zero router)")] = 200,
    calib_batches: Annotated[int, typer.Option(help="split: calibration batches from the source run's data")] = 8,
    hf_family: Annotated[str | None, typer.Option(help="write a transformers checkpoint of this family instead "
                                                       "(mixtral, qwen3_moe, ...)")] = None,
    seed: Annotated[int, typer.Option(help="seed of router init, noise and clustering")] = 0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out folder")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the methods and exit")] = False,
) -> None:
    """Convert the dense model SRC into an MoE with METHOD and write it to --out (a moekit run folder that
    `moekit train --init` continues, or with --hf-family a transformers checkpoint); prints a summary."""
    from moekit.convert.run import list_methods

    if list_:
        for name, desc in list_methods().items():
            typer.echo(f"{name:10s} {desc}")
        return
    if method is None or src is None or out is None:
        raise ValueError("convert: give METHOD SRC --out DST (or --list)")
    from moekit.convert import SplitConfig, UpcycleConfig
    from moekit.convert.run import convert_run

    up = sp = None
    if method == "upcycle":
        up = UpcycleConfig(num_experts=experts, k=k, granularity=granularity, router_std=router_std, noise=noise,
                           reinit=reinit, seed=seed)
    elif method == "split":
        sp = SplitConfig(num_experts=experts, k=k, cluster=cluster, router_steps=router_steps, seed=seed)
    summary = convert_run(method, src, out, upcycle_cfg=up, split_cfg=sp, calib_batches=calib_batches,
                          hf_family=hf_family, force=force)
    typer.echo(summary.table())
    typer.echo(f"wrote {out}")
