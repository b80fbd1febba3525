"""`moekit export`: write a trained moekit run as a Hugging Face transformers checkpoint."""

from __future__ import annotations

import warnings
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
    force: Annotated[bool, typer.Option("--force", help="replace an existing output directory")] = False,
) -> None:
    """Export the model of RUN, with its tokenizer, to a transformers FAMILY checkpoint with identical
    logits, or fail with every reason the family cannot express it."""
    from moekit.hf.export import export_lm
    from moekit.train import load_model
    from moekit.train.checkpoint import CKPT, checkpoint_dir

    if to != "hf":
        raise typer.BadParameter(f"only 'hf' is supported, got {to!r}", param_hint="--to")
    ckpt = checkpoint_dir(run)
    run_dir = ckpt.parent if ckpt.name == CKPT else ckpt
    target = out or run_dir / f"hf-{family}"
    tokenizer = run_dir / "tokenizer.json"
    if not tokenizer.is_file():
        warnings.warn(f"{tokenizer} is missing: the export has no tokenizer", stacklevel=1)
    model = load_model(run)
    export_lm(model, family, target, check=check, tokenizer=tokenizer if tokenizer.is_file() else None,
              overwrite=force)
    typer.echo(f"wrote {target} (transformers {family}; load with AutoModelForCausalLM.from_pretrained)")
