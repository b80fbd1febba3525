"""`moekit export`: write a trained moekit run as a Hugging Face transformers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export(
    run: Annotated[Path, typer.Argument(help="run directory written by `moekit train` (or its checkpoint folder)")],
    to: Annotated[str, typer.Option("--to", help="target format (only 'hf')")] = "hf",
    family: Annotated[
        str, typer.Option(help="transformers family: mixtral | olmoe | qwen3_moe | glm4_moe | deepseek_v3")
    ] = "mixtral",
    out: Annotated[Path | None, typer.Option(help="output directory (default: RUN/hf-FAMILY)")] = None,
    check: Annotated[bool, typer.Option(help="verify the exported logits before writing")] = True,
) -> None:
    """Export the model of RUN to a transformers FAMILY checkpoint with identical logits, or fail
    with every reason the family cannot express it."""
    from moekit.hf.export import ExportError, export_lm
    from moekit.train import load_model

    if to != "hf":
        typer.echo(f"error: --to must be 'hf', got {to!r}", err=True)
        raise typer.Exit(2)
    target = out or Path(run) / f"hf-{family}"
    try:
        model = load_model(run)
        export_lm(model, family, target, check=check)
    except (FileNotFoundError, ValueError, ExportError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {target} (transformers {family}; load with AutoModelForCausalLM.from_pretrained)")
