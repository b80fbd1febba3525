"""`moekit route`: train, evaluate, audit and serve routers over whole LLMs (see moekit.llmroute)."""

from __future__ import annotations

import typer

app = typer.Typer(help=__doc__, no_args_is_help=True)
