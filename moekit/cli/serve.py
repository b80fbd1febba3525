"""`moekit serve MODEL`: an OpenAI-compatible HTTP server for a moekit run or a Hugging Face MoE checkpoint folder
(/v1/completions, /v1/chat/completions with streaming, /v1/models, /health, /metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.options import ThreadsOpt, set_threads


def serve(
    model: Annotated[Path, typer.Argument(help="a moekit run folder or a Hugging Face MoE checkpoint folder")],
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1 keeps it local)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    name: Annotated[str | None, typer.Option(help="model id clients send (default: the folder's name)")] = None,
    expert_memory: Annotated[
        str | None,
        typer.Option(help="offload the experts: cache budget ('200MB', '1GiB', '50%', '0.5'); default all resident"),
    ] = None,
    policy: Annotated[str, typer.Option(help="expert cache eviction policy: lru | lfu")] = "lru",
    prefetch: Annotated[
        bool, typer.Option("--prefetch", help="prefetch next-layer experts (inter-layer affinity)")
    ] = False,
    max_queue: Annotated[int, typer.Option(help="requests that may wait while one generates; more get 429")] = 16,
    timeout_s: Annotated[float, typer.Option(help="seconds from a request's arrival to its last token")] = 300.0,
    max_tokens: Annotated[int, typer.Option(help="most tokens a request may ask for (and the default)")] = 256,
    api_keys_env: Annotated[
        str | None,
        typer.Option("--api-keys-env", help="environment variable with the clients' bearer keys, comma-separated"),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    threads: ThreadsOpt = 0,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (per-request steering in the body's `moekit` field)."""
    from moekit.infer.engines import load_engine
    from moekit.infer.serve import ServeConfig, run_server

    set_threads(threads)
    config = ServeConfig(host=host, port=port, max_queue=max_queue, timeout_s=timeout_s, max_tokens=max_tokens,
                         api_keys_env=api_keys_env)
    engine = load_engine(model, name=name, expert_memory=expert_memory, policy=policy, prefetch=prefetch,
                         device=device)
    run_server(engine, config)
