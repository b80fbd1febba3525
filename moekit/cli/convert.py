"""`moekit convert`: turn a dense model (moekit run or transformers Llama/Qwen folder) into an MoE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert(
    method: Annotated[str | None, typer.Argument(help="conversion method (see --list)")] = None,
    src: Annotated[list[Path] | None, typer.Argument(
        help="dense moekit run/checkpoint, or a transformers folder (btx: the branches; prompts: base, then experts; "
             "nexus: seed, then branches)")] = None,
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
    calib_batches: Annotated[int, typer.Option(help="split, nexus: calibration batches from the (branch) run's data")
                             ] = 8,
    prompts: Annotated[Path | None, typer.Option(help="prompts: JSON file, one list of prompt texts per expert")
                       ] = None,
    mode: Annotated[str, typer.Option(help="prompts: router gate mode 'hidden', 'embed' or 'random'")] = "hidden",
    shared_seed: Annotated[bool, typer.Option(help="nexus: keep the seed's FFN as a shared expert")] = True,
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
    from moekit.convert.run import COMPOSE, convert_run

    if method in COMPOSE:
        _compose(method, src, out, k=k, router_std=router_std, prompts=prompts, mode=mode, shared_seed=shared_seed,
                 calib_batches=calib_batches, hf_family=hf_family, seed=seed, force=force)
        return
    if len(src) != 1:
        raise ValueError(f"convert {method}: give one SRC, got {len(src)}")

    up = sp = None
    if method == "upcycle":
        up = UpcycleConfig(num_experts=experts, k=k, granularity=granularity, router_std=router_std, noise=noise,
                           reinit=reinit, seed=seed)
    elif method == "split":
        sp = SplitConfig(num_experts=experts, k=k, cluster=cluster, router_steps=router_steps, seed=seed)
    summary = convert_run(method, src[0], out, upcycle_cfg=up, split_cfg=sp, calib_batches=calib_batches,
                          hf_family=hf_family, force=force)
    typer.echo(summary.table())
    typer.echo(f"wrote {out}")


def _compose(method: str, src: list[Path], out: Path, *, k: int, router_std: float, prompts: Path | None, mode: str,
             shared_seed: bool, calib_batches: int, hf_family: str | None, seed: int, force: bool) -> None:
    """btx / prompts / nexus: several dense SRCs into one MoE."""
    import json

    from moekit.convert.btx import BTXConfig
    from moekit.convert.compose_run import compose_run
    from moekit.convert.nexus import NexusConfig
    from moekit.convert.prompts import PromptsConfig

    texts = None
    if method == "prompts":
        if prompts is None:
            raise ValueError("convert prompts: give --prompts FILE (JSON: one list of prompt texts per expert)")
        texts = json.loads(prompts.read_text())
        if not isinstance(texts, list) or not all(isinstance(t, list) and all(isinstance(x, str) for x in t)
                                                  for t in texts):
            raise ValueError(f"{prompts}: expected a JSON list of lists of prompt texts (one list per expert)")
    summary = compose_run(
        method, src, out, btx_cfg=BTXConfig(k=k, router_std=router_std, seed=seed) if method == "btx" else None,
        prompts_cfg=PromptsConfig(mode=mode, k=k, seed=seed) if method == "prompts" else None, prompts=texts,
        nexus_cfg=NexusConfig(k=k, shared_seed=shared_seed, seed=seed) if method == "nexus" else None,
        calib_batches=calib_batches, hf_family=hf_family, force=force)
    typer.echo(summary.table())
    typer.echo(f"wrote {out}")
