"""`moekit route`: train, evaluate, audit and serve routers over whole LLMs (see moekit.llmroute)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help=__doc__, no_args_is_help=True)

DataArg = Annotated[str, typer.Argument(help="dataset file or folder (e.g. ../shared/data/routellm-mmlu)")]
FormatOpt = Annotated[str, typer.Option("--format", help="routellm | routerbench | sprout")]
RunArg = Annotated[Path, typer.Argument(help="folder written by `moekit route train`")]
CacheOpt = Annotated[
    Path | None, typer.Option("--cache", help="embedding cache folder (default: $MOEKIT_CACHE or ~/.cache/moekit)")
]


def _cache(cache: Path | None) -> Path:
    if cache is not None:
        return cache
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "llmroute"


def _parse_args(router_args: str | None, kv: list[str] | None) -> dict:
    """Router arguments from a JSON string / JSON or YAML file, then `key=value` pairs (values parsed as JSON)."""
    args: dict = {}
    if router_args:
        p = Path(router_args)
        if p.exists():
            text = p.read_text()
            if p.suffix in (".yaml", ".yml"):
                from moekit.utils.deps import require

                args = require("yaml").safe_load(text) or {}
            else:
                args = json.loads(text)
        else:
            args = json.loads(router_args)
        if not isinstance(args, dict):
            raise typer.BadParameter(f"--router-args: expected a JSON object, found {type(args).__name__}")
    for item in kv or []:
        if "=" not in item:
            raise typer.BadParameter(f"--arg: expected key=value, found {item!r}")
        k, v = item.split("=", 1)
        try:
            args[k] = json.loads(v)
        except json.JSONDecodeError:
            args[k] = v
    return args


@app.command()
def train(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="folder to write the trained router into")],
    format: FormatOpt = "routellm",
    router: Annotated[str, typer.Option(help="router name (see `moekit route list`)")] = "knn",
    arg: Annotated[list[str] | None, typer.Option("--arg", help="router argument key=value (repeatable)")] = None,
    router_args: Annotated[str | None, typer.Option(help="router arguments: JSON, or a .json/.yaml file")] = None,
    embedder: Annotated[str, typer.Option(help="tfidf | sentence-transformers")] = "tfidf",
    embedder_arg: Annotated[
        list[str] | None, typer.Option("--embedder-arg", help="embedder argument key=value, e.g. dim=512 or model=DIR")
    ] = None,
    split: Annotated[str, typer.Option(help="query | category (held-out categories)")] = "query",
    test_size: Annotated[float, typer.Option(help="share of queries (or categories) held out for test")] = 0.2,
    val_size: Annotated[float, typer.Option(help="share held out for validation / calibration")] = 0.0,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    models: Annotated[str | None, typer.Option(help="comma-separated models to keep (default: all)")] = None,
    prices: Annotated[str | None, typer.Option(help="price file {model: {input, output}} in $ per M tokens")] = None,
    output_tokens: Annotated[int, typer.Option(help="assumed answer tokens when the data has none")] = 16,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="allow RouterBench's .pkl (trusted files only)")
    ] = False,
    calibrate_share: Annotated[
        float | None, typer.Option(help="two models: print the mu giving this share of strong calls")
    ] = None,
    cache: CacheOpt = None,
) -> None:
    """Train a router on the training part of a dataset and save it to --out."""
    from moekit.llmroute.pipeline import DataConfig, TrainConfig, load_trained, prepare
    from moekit.llmroute.pipeline import train as train_router
    from moekit.llmroute.table import SplitConfig

    config = TrainConfig(
        data=DataConfig(
            path=str(Path(data).resolve()),
            format=format,
            prices=prices,
            output_tokens=output_tokens,
            allow_pickle=allow_pickle,
        ),
        router=router,
        router_args=_parse_args(router_args, arg),
        embedder=embedder,
        embedder_args=_parse_args(None, embedder_arg),
        split=SplitConfig(by=split, test_size=test_size, val_size=val_size, seed=seed),
        models=models.split(",") if models else None,
    )
    r = train_router(config, out, cache_dir=_cache(cache))
    typer.echo(f"trained {r.name!r} on models {r.models}; saved to {out}")
    if calibrate_share is not None:
        _, train_t, val_t, _ = prepare(config)
        part = val_t if len(val_t) else train_t
        run = load_trained(out)
        mu = run.router.calibrate(run.embed(part.queries, _cache(cache)), calibrate_share, part)
        info = json.loads((out / "train.json").read_text())
        info["calibration"] = {"strong_share": calibrate_share, "mu": mu, "on": "validation" if len(val_t) else "train"}
        (out / "train.json").write_text(json.dumps(info, indent=2))
        typer.echo(f"mu for {calibrate_share:.0%} strong calls: {mu:.5f} (serve as model router-<name>-{mu:.5f})")


@app.command(name="eval")
def eval_cmd(
    runs: Annotated[list[Path], typer.Argument(help="trained router folders (same data and split)")],
    out: Annotated[Path | None, typer.Option(help="folder for metrics.json and plots")] = None,
    baselines: Annotated[bool, typer.Option(help="also evaluate random, oracle, best, zero")] = True,
    part: Annotated[str, typer.Option(help="test | val | all")] = "test",
    cache: CacheOpt = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="evaluate on this other dataset instead (all of it; models matched by name)"),
    ] = None,
    format: Annotated[str | None, typer.Option("--format", help="format of --data (default: the runs')")] = None,
    model_map: Annotated[
        list[str] | None,
        typer.Option("--model-map", help="COLUMN=MODEL: a model column of --data under another name (repeatable)"),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="run: the runs' own test part | subjects: re-train in K-fold cross-validation, in-domain "
            "(folds of questions) and held-out subjects (folds of subjects) side by side"
        ),
    ] = "run",
    folds: Annotated[int, typer.Option(help="--split subjects: number of folds K")] = 5,
    seeds: Annotated[str, typer.Option(help="--split subjects: comma-separated fold seeds (spread)")] = "0,1",
    rate: Annotated[
        list[float] | None,
        typer.Option(
            "--rate", help="--split subjects: strong-call rate to calibrate on held-out subjects (repeatable)"
        ),
    ] = None,
) -> None:
    """Print the metrics table of trained routers on their test data (or on --data); write metrics.json and plots."""
    from rich.console import Console
    from rich.table import Table

    if split not in ("run", "subjects"):
        raise typer.BadParameter(f"--split: expected run or subjects, found {split!r}")
    if split == "subjects":
        _eval_cv(runs, out, baselines, _cache(cache), folds, seeds, tuple(rate or ()))
        return
    from moekit.llmroute.pipeline import evaluate_runs
    from moekit.llmroute.plots import plot_cost_quality, plot_pgr

    mapping = {}
    for item in model_map or []:
        column, sep, model = item.partition("=")
        if not sep or not column or not model:
            raise typer.BadParameter(f"--model-map: expected COLUMN=MODEL, found {item!r}")
        mapping[column] = model
    table, evals = evaluate_runs(
        [str(r) for r in runs],
        baselines=baselines,
        part=part,
        cache_dir=_cache(cache),
        data=data,
        data_format=format,
        model_map=mapping,
    )
    two = len(table.models) == 2
    what = f"queries of {data}" if data else f"{part} queries"
    t = Table(title=f"{len(table)} {what}, models {table.models}")
    cols = ["router"] + (["APGR", "CPT(50%)", "CPT(80%)"] if two else []) + ["cost cut @95%", "AIQ", "max quality"]
    for c in cols:
        t.add_column(c, justify="left" if c == "router" else "right")
    keys = (["apgr", "cpt50", "cpt80"] if two else []) + ["cost_cut_at_target", "aiq", "max_quality"]
    for ev in evals:
        r = ev.row()
        cells = [f"{r[k]:.3f}" + (f" ± {r[k + '_std']:.3f}" if k + "_std" in r else "") for k in keys]
        t.add_row(ev.name + (f" (mean of {ev.draws})" if ev.draws > 1 else ""), *cells)
    Console().print(t)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps([ev.row() for ev in evals], indent=2))
        paths = [plot_cost_quality(evals, table, out / "cost_quality.png")]
        if two:
            paths.append(plot_pgr(evals, out / "pgr.png"))
        typer.echo("wrote " + ", ".join(str(p) for p in [out / "metrics.json", *paths]))


def _eval_cv(runs, out, baselines, cache, folds, seeds, rates) -> None:
    """`route eval --split subjects`: the in-domain and held-out-subject table, with spreads."""
    from rich.console import Console
    from rich.table import Table

    from moekit.llmroute.pipeline import cross_validate_runs

    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise typer.BadParameter(f"--seeds: expected comma-separated integers, found {seeds!r}") from None
    table, rows = cross_validate_runs(
        [str(r) for r in runs],
        folds=folds,
        seeds=seed_list,
        rates=rates,
        baselines=baselines,
        cache_dir=cache,
        progress=lambda m: typer.echo(m, err=True),
    )
    t = Table(title=f"{len(table)} queries pooled over {folds} folds; mean ± sd over seeds {list(seed_list)}")
    for c in ["router", "in-domain APGR", "held-out APGR", "in-domain cut@95%", "held-out cut@95%"]:
        t.add_column(c, justify="left" if c == "router" else "right")
    if rates:
        t.add_column("held-out rate / requested", justify="right")

    def cell(r: dict, k: str) -> str:
        text = f"{r[k]:.3f} ± {r[k + '_std_seeds']:.3f}"
        return text + (f" (draws ± {r[k + '_std_draws']:.3f})" if k + "_std_draws" in r else "")

    by_split = {(r["split"], r["router"]): r for r in rows}
    for name in dict.fromkeys(r["router"] for r in rows):
        q, s = by_split[("query-cv", name)], by_split[("subjects-cv", name)]
        cal = [" ".join(f"{v:.2f}/{float(k):.2f}" for k, v in s.get("calibration", {}).items())] if rates else []
        keys = ("apgr", "cost_cut_at_target")
        t.add_row(name, cell(q, keys[0]), cell(s, keys[0]), cell(q, keys[1]), cell(s, keys[1]), *cal)
    Console().print(t)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics_cv.json").write_text(json.dumps(rows, indent=2))
        typer.echo(f"wrote {out / 'metrics_cv.json'}")


@app.command()
def audit(
    run: RunArg,
    mu: Annotated[float, typer.Option(help="trade-off (0 = best quality, 1 = lowest cost)")] = 0.5,
    part: Annotated[str, typer.Option(help="test | val | all")] = "test",
    cache: CacheOpt = None,
) -> None:
    """Share of each category's queries that the router sends to each model (robustness audit)."""
    from rich.console import Console
    from rich.table import Table

    from moekit.llmroute.evaluate import audit as audit_router
    from moekit.llmroute.pipeline import load_trained, prepare

    trained = load_trained(run)
    full, _, val_t, test_t = prepare(trained.config)
    table = {"test": test_t, "val": val_t, "all": full}[part]
    cats, shares = audit_router(trained.router, trained.embed(table.queries, _cache(cache)), table, mu)
    t = Table(title=f"{run.name} at mu={mu}: share of each category sent to each model ({part})")
    t.add_column("category")
    t.add_column("queries", justify="right")
    for m in table.models:
        t.add_column(m.split("/")[-1], justify="right")
    labels = table.categories
    for c, row in zip(cats, shares, strict=True):
        t.add_row(c, str(labels.count(c)), *(f"{v:.2f}" for v in row))
    Console().print(t)


@app.command(name="list")
def list_cmd() -> None:
    """List the registered routers."""
    from moekit.llmroute.routers import get, list_routers

    for name in list_routers():
        doc = (sys.modules[get(name).__module__].__doc__ or "").strip()
        typer.echo(f"{name:10s} {doc.splitlines()[0] if doc else ''}")


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", help="routes.yaml")],
    host: Annotated[str | None, typer.Option(help="override server.host")] = None,
    port: Annotated[int | None, typer.Option(help="override server.port")] = None,
    api_keys_env: Annotated[
        str | None,
        typer.Option(
            "--api-keys-env",
            help="environment variable with the clients' bearer keys, comma-separated (default: server.api_keys_env)",
        ),
    ] = None,
) -> None:
    """Serve an OpenAI-compatible router (/v1/chat/completions, /v1/models, /health, /metrics)."""
    from moekit.llmroute.config import RoutesConfig
    from moekit.llmroute.server import run_server

    run_server(RoutesConfig.from_file(config), host=host, port=port, api_keys_env=api_keys_env)
