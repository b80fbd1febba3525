"""Option types shared by several verbs."""

from __future__ import annotations

from typing import Annotated

import typer

ThreadsOpt = Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="override any config field: KEY=VALUE (JSON values), e.g. router=topp, router_args.k=2, lr=1e-3"
    ),
]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]
DeviceOpt = Annotated[str, typer.Option(help="where to train: cpu, cuda, cuda:N, or auto (CUDA when available)")]
DtypeOpt = Annotated[
    str, typer.Option(help="forward compute dtype: float32, or bfloat16 (autocast; CUDA, or CPU with --bf16-on-cpu)")
]
Bf16OnCpuOpt = Annotated[bool, typer.Option("--bf16-on-cpu", help="allow --dtype bfloat16 on CPU (much slower)")]


def set_threads(threads: int) -> None:
    """Apply --threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)
