"""`moekit generate`: sample text from a trained run (KV-cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import ThreadsOpt, set_threads


def generate(
    run: Annotated[Path, typer.Argument(help="run directory written by `moekit train`")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "The",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 60,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.9,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    threads: ThreadsOpt = 0,
) -> None:
    """Continue PROMPT with the model in RUN."""
    import torch

    from moekit.data import BPETokenizer
    from moekit.train import load_model

    set_threads(threads)
    tok_path = Path(run) / "tokenizer.json"
    model = load_model(run).eval()
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} is missing: the run has no tokenizer")
    tok = BPETokenizer.load(tok_path)
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty after tokenisation")
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_id=tok.eos_id,
        generator=torch.Generator().manual_seed(seed),
    )
    typer.echo(tok.decode(out[0].tolist(), skip_special_tokens=True))
