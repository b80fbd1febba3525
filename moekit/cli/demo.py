"""Build an MoE layer with each registered router on random data and print a table."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    tokens: Annotated[int, typer.Option(help="tokens in the random batch")] = 2048,
    dim: Annotated[int, typer.Option(help="model width D")] = 128,
    experts: Annotated[int, typer.Option(help="number of experts E")] = 8,
    hidden: Annotated[int, typer.Option(help="expert width F")] = 256,
    threads: Annotated[int, typer.Option(help="torch threads (0 = leave as is)")] = 0,
) -> None:
    """Route one random batch through an MoE layer with every registered router; print a table."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from moekit.bench.survey import survey_routers

    if threads:
        torch.set_num_threads(threads)
    rows = survey_routers(tokens=tokens, dim=dim, num_experts=experts, hidden=hidden)
    table = Table(title=f"moekit routers: T={tokens}, D={dim}, E={experts}, F={hidden} (random data, eval mode)")
    for col in ("router", "active experts/token", "max/mean load", "dropped %", "ms"):
        table.add_column(col, justify="left" if col == "router" else "right")
    for r in rows:
        table.add_row(
            r.router, f"{r.active_per_token:.2f}", f"{r.max_over_mean_load:.2f}", f"{r.dropped_pct:.1f}", f"{r.ms:.1f}"
        )
    Console().print(table)
