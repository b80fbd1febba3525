"""`moekit generate`: sample text from a trained run (KV-cached), optionally with offloaded experts
(`--expert-memory`) and steered experts (`--disable-experts`, `--force-expert`)."""

from __future__ import annotations

from contextlib import nullcontext
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
    expert_memory: Annotated[
        str | None,
        typer.Option(help="offload the experts: cache budget ('200MB', '1GiB', '50%', '0.5'); default all resident"),
    ] = None,
    policy: Annotated[str, typer.Option(help="expert cache eviction policy: lru | lfu")] = "lru",
    prefetch: Annotated[
        bool, typer.Option("--prefetch", help="prefetch next-layer experts (inter-layer affinity)")
    ] = False,
    calibration: Annotated[
        Path | None, typer.Option(help="trace.parquet from `moekit analyze` that seeds the prefetcher")
    ] = None,
    disable_experts: Annotated[
        str | None, typer.Option(help="LAYER:EXPERT,... experts no token may use (logits -> -inf before top-k)")
    ] = None,
    force_expert: Annotated[str | None, typer.Option(help="LAYER:EXPERT,... experts every token uses")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="print the expert cache's counters after the text")] = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Continue PROMPT with the model in RUN."""
    import torch

    from moekit.data import BPETokenizer
    from moekit.infer.steer import parse_layer_experts, steer
    from moekit.train import load_model

    set_threads(threads)
    disable = parse_layer_experts(disable_experts, "--disable-experts")
    force = parse_layer_experts(force_expert, "--force-expert")
    if expert_memory is None and (prefetch or calibration is not None or policy != "lru"):
        raise typer.BadParameter("needs --expert-memory", param_hint="--policy/--prefetch/--calibration")
    tok_path = Path(run) / "tokenizer.json"
    if expert_memory is None:
        model = load_model(run).eval()
    else:
        from moekit.infer import load_offloaded

        model = load_offloaded(
            run, expert_memory=expert_memory, policy=policy, prefetch=prefetch, calibration=calibration
        )
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} is missing: the run has no tokenizer")
    tok = BPETokenizer.load(tok_path)
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty after tokenisation")
    steering = steer(model, disable=disable, force=force) if disable or force else nullcontext()
    try:
        with steering:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_id=tok.eos_id,
                generator=torch.Generator().manual_seed(seed),
            )
    finally:
        if expert_memory is not None:
            model.offloader.close()
    typer.echo(tok.decode(out[0].tolist(), skip_special_tokens=True))
    if stats and expert_memory is not None:
        s, cap = model.offloader.stats, model.offloader.cache.capacity_bytes
        typer.echo(
            f"expert cache: {s.hits} hits, {s.misses} misses (hit rate {s.hit_rate:.3f}), {s.bytes_loaded} bytes "
            f"loaded, {s.prefetch_hits} prefetch hits, peak {s.peak_bytes} of {cap} bytes"
        )
