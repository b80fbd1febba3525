"""Entry point of the `moekit` command. Each verb lives in its own file under `moekit/cli/`."""

from __future__ import annotations

from typing import Annotated

import typer

from moekit.cli import adapt as adapt_cli
from moekit.cli import analyze, bench, demo, evaluate, export, generate, inspect, quickstart, ref, route, train, tune
from moekit.cli import cache_sim as cache_sim_cli
from moekit.cli import compress as compress_cli
from moekit.cli import convert as convert_cli
from moekit.cli import serve as serve_cli
from moekit.cli.base import Group, plain_help

app = typer.Typer(
    name="moekit",
    help="moekit: Mixture-of-Experts routers, experts, analysis and serving under one contract.",
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MOEKIT_DEBUG", help="show the full traceback when a command fails")
    ] = False,
) -> None:
    """moekit: Mixture-of-Experts routers, experts, analysis and serving under one contract."""


app.command(name="demo", help=demo.__doc__)(demo.demo)
app.command(name="quickstart")(quickstart.quickstart)
app.command(name="train")(train.train)
app.command(name="tune")(tune.tune)
app.command(name="eval")(evaluate.eval_cmd)
app.command(name="generate")(generate.generate)
app.command(name="inspect")(inspect.inspect)
app.command(name="export")(export.export)
app.command(name="analyze")(analyze.analyze)
app.command(name="cache-sim")(cache_sim_cli.cache_sim)
app.command(name="compress")(compress_cli.compress)
app.command(name="adapt")(adapt_cli.adapt)
app.command(name="convert")(convert_cli.convert)
app.command(name="serve")(serve_cli.serve)
app.add_typer(route.app, name="route")
app.add_typer(bench.app, name="bench")
app.add_typer(ref.app, name="ref")
plain_help(app)


def main() -> None:
    """Run the `moekit` command line."""
    app()


if __name__ == "__main__":
    main()
