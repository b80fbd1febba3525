"""Train a router on a dataset and save it; load it back with its embedder. The CLI calls these.

A trained router is a folder: `router.json` + `weights.npz` (the router), `embedder/` (the fitted
embedder), and `train.json` (the data and split it was trained on, so `eval` can rebuild the test set).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moekit.llmroute.embed import encode_cached, load_embedder, make_embedder
from moekit.llmroute.loaders import FORMATS, MissingModels, load_table
from moekit.llmroute.prices import PriceTable
from moekit.llmroute.routers import Router, create, load_router
from moekit.llmroute.table import RoutingTable, SplitConfig, split_rows


@dataclass
class DataConfig:
    """Where a routing table comes from."""

    path: str  # file or folder of the dataset
    format: str = "routellm"  # one of routellm, routerbench, sprout
    prices: str | None = None  # YAML/JSON price file ({model: {input, output}} $ per M tokens); None = defaults
    output_tokens: int = 16  # assumed answer length in tokens when the data has none (routellm)
    allow_pickle: bool = False  # RouterBench's .pkl only: a pickle runs code when loaded

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"DataConfig.format: expected one of {list(FORMATS)}, found {self.format!r}")
        if self.output_tokens < 0:
            raise ValueError(f"DataConfig.output_tokens: expected >= 0, found {self.output_tokens}")

    def load(self, models: list[str] | None = None) -> RoutingTable:
        """The table, restricted to `models` (in that order; chosen before any cell is checked) when given."""
        prices = PriceTable.from_file(self.prices) if self.prices else PriceTable.default()
        return load_table(
            self.path,
            format=self.format,
            prices=prices,
            output_tokens=self.output_tokens,
            allow_pickle=self.allow_pickle,
            models=models,
        )


@dataclass
class TrainConfig:
    """One router training run."""

    data: DataConfig  # the dataset
    router: str = "knn"  # registered router name
    router_args: dict = field(default_factory=dict)  # keyword arguments of the router
    embedder: str = "tfidf"  # "tfidf" or "sentence-transformers"
    embedder_args: dict = field(default_factory=dict)  # keyword arguments of the embedder
    split: SplitConfig = field(default_factory=SplitConfig)  # train/val/test split
    models: list[str] | None = None  # restrict the table to these models (None = all)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.split, dict):
            self.split = SplitConfig(**self.split)


def prepare(config: TrainConfig) -> tuple[RoutingTable, RoutingTable, RoutingTable, RoutingTable]:
    """(full, train, val, test) tables of a training config."""
    table = config.data.load(config.models)
    parts = split_rows(table, config.split)
    return table, table.subset(parts.train), table.subset(parts.val), table.subset(parts.test)


def train(config: TrainConfig, out: str | Path, *, cache_dir: str | Path | None = None) -> Router:
    """Fit the embedder and the router on the training part and save both (and `train.json`) into `out`."""
    out = Path(out)
    _, train_t, _, _ = prepare(config)
    t0 = time.perf_counter()
    embedder = make_embedder(config.embedder, **config.embedder_args).fit(train_t.queries)
    x = encode_cached(embedder, train_t.queries, cache_dir)
    router = create(config.router, **config.router_args).fit(train_t, x, embedder=embedder)
    router.save(out)
    embedder.save(out / "embedder")
    info = {"config": asdict(config), "train_queries": len(train_t), "fit_seconds": time.perf_counter() - t0}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    return router


@dataclass
class Trained:
    """A router loaded from its folder, with its embedder and training config."""

    router: Router
    embedder: object
    config: TrainConfig

    def embed(self, texts: list[str], cache_dir: str | Path | None = None) -> np.ndarray:
        return encode_cached(self.embedder, texts, cache_dir)


def load_trained(folder: str | Path) -> Trained:
    """Load a folder written by `train`."""
    folder = Path(folder)
    info_path = folder / "train.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{folder}: not a trained router folder (expected {info_path})")
    info = json.loads(info_path.read_text())
    return Trained(load_router(folder), load_embedder(folder / "embedder"), TrainConfig(**info["config"]))


BASELINES = ("random", "oracle", "best", "zero")
RANDOMISED = ("random", "zero")  # baselines that draw at random: reported as the mean of DRAWS seeds
DRAWS = 10  # as RouteLLM reports its random router


def load_other_table(
    run: Trained, path: str, *, format: str | None = None, model_map: dict[str, str] | None = None
) -> RoutingTable:
    """Another dataset for a trained router (cross-benchmark evaluation), its model columns matched by name.

    The data is read with the run's data options (prices, output tokens) but `path` and `format`. `model_map`
    renames columns (column name in the data -> model name the router knows; the column is priced as that
    model). The table comes back with the router's models, in the router's order; a model the data lacks
    is an error naming what the router needs and what the data has.
    """
    d = run.config.data
    fmt = format or d.format
    prices = PriceTable.from_file(d.prices) if d.prices else PriceTable.default()
    model_map = dict(model_map or {})
    column_of = {model: column for column, model in model_map.items()}
    for column, model in model_map.items():
        if model in prices.prices and column not in prices.prices:
            prices.prices[column] = prices.prices[model]
    wanted = [column_of.get(m, m) for m in run.router.models]
    try:
        table = load_table(
            path, format=fmt, prices=prices, output_tokens=d.output_tokens, allow_pickle=d.allow_pickle, models=wanted
        )
    except MissingModels as exc:
        need = [m for m in run.router.models if column_of.get(m, m) in exc.missing]
        raise ValueError(
            f"{path}: no column for models {need} that the router was trained on (router models: "
            f"{run.router.models}; model columns of the data: {exc.found}); "
            "map a column to a model with --model-map COLUMN=MODEL"
        ) from None
    return RoutingTable(table.queries, list(run.router.models), table.quality, table.cost, table.categories)


def evaluate_runs(
    folders: list[str | Path],
    *,
    baselines: bool = True,
    part: str = "test",
    cache_dir: str | Path | None = None,
    data: str | Path | None = None,
    data_format: str | None = None,
    model_map: dict[str, str] | None = None,
):
    """Evaluate trained routers (and the baselines) on the `part` ("test", "val" or "all") of their data.

    All folders must have been trained on the same data and split. With `data`, they are evaluated instead
    on the whole of that other table (cross-benchmark: see `load_other_table`); they must then share their
    models, and the baselines are fitted on that table. Returns (table, [Evaluation]).
    """
    from moekit.llmroute.evaluate import evaluate, mean_evaluation

    if not folders:
        raise ValueError("evaluate_runs: expected at least one trained router folder")
    runs = [load_trained(f) for f in folders]
    if data is not None:
        for f, r in zip(folders[1:], runs[1:], strict=True):
            if sorted(r.router.models) != sorted(runs[0].router.models):
                raise ValueError(
                    f"{f}: trained on models {r.router.models}, {folders[0]} on {runs[0].router.models}; "
                    "evaluate them apart"
                )
        table = load_other_table(runs[0], str(data), format=data_format, model_map=model_map)
        train_t = table
    else:

        def same_test(c: dict) -> tuple:  # the test part depends on the split's kind, test share and seed only
            sp = c["split"]
            return c["data"], c["models"], sp["by"], sp["test_size"], sp["seed"], *([] if part == "test" else [sp])

        first = asdict(runs[0].config)
        for f, r in zip(folders[1:], runs[1:], strict=True):
            if same_test(asdict(r.config)) != same_test(first):
                raise ValueError(f"{f}: trained on other data or another split than {folders[0]}; evaluate them apart")
        full, train_t, val_t, test_t = prepare(runs[0].config)
        parts = {"test": test_t, "val": val_t, "all": full}
        if part not in parts:
            raise ValueError(f"part: expected one of {list(parts)}, found {part!r}")
        table = parts[part]
        if len(table) == 0:
            raise ValueError(f"the {part!r} part of the split is empty")
    evals = []
    if baselines:
        x_train = np.zeros((len(train_t), 1), np.float32)
        x_eval = np.zeros((len(table), 1), np.float32)
        for name in BASELINES:
            if name in RANDOMISED:
                draws = [evaluate(create(name, seed=s).fit(train_t, x_train), x_eval, table) for s in range(DRAWS)]
                evals.append(mean_evaluation(draws, name))
            else:
                evals.append(evaluate(create(name).fit(train_t, x_train), x_eval, table, name=name))
    for f, run in zip(folders, runs, strict=True):
        x = run.embed(table.queries, cache_dir)
        evals.append(evaluate(run.router, x, table.select_models(run.router.models), name=Path(f).name))
    return table, evals


def cross_validate_runs(
    folders: list[str | Path],
    *,
    folds: int = 5,
    seeds: tuple[int, ...] = (0, 1),
    rates: tuple[float, ...] = (),
    baselines: bool = True,
    cache_dir: str | Path | None = None,
    progress=None,
) -> tuple[RoutingTable, list[dict]]:
    """Re-train each run's router (its router, arguments and embedder from `train.json`) in K-fold
    cross-validation on the run's whole table, by question and by subject (see `crossval.compare_splits`).

    The runs must share their data, models and embedder. Baselines: random (DRAWS draws) and the oracle.
    Returns (table, rows), one row per (split, router).
    """
    from moekit.llmroute.crossval import compare_splits

    if not folders:
        raise ValueError("cross_validate_runs: expected at least one trained router folder")
    runs = [load_trained(f) for f in folders]
    first = runs[0].config
    for f, r in zip(folders[1:], runs[1:], strict=True):
        c = r.config
        if (c.data, c.models, c.embedder, c.embedder_args) != (
            first.data,
            first.models,
            first.embedder,
            first.embedder_args,
        ):
            raise ValueError(
                f"{f}: trained on other data, models or embedder than {folders[0]}; cross-validate them apart"
            )
    table = first.data.load(first.models)
    routers = [("random", {}), ("oracle", {})] if baselines else []
    labels = [name for name, _ in routers]
    for f, r in zip(folders, runs, strict=True):
        routers.append((r.config.router, dict(r.config.router_args)))
        labels.append(Path(f).name)
    rows = compare_splits(
        table,
        routers,
        folds=folds,
        seeds=seeds,
        embedder=first.embedder,
        embedder_args=first.embedder_args,
        cache_dir=cache_dir,
        draws=DRAWS,
        rates=rates,
        randomised=RANDOMISED,
        progress=progress,
        labels=labels,
    )
    return table, rows
