"""Loaders that turn public routing datasets into a `RoutingTable`.

- RouterBench: one row per prompt, columns `prompt`, `eval_name`, `<model>` (quality) and
  `<model>|total_cost` (dollars), from Parquet or CSV — or from its pandas pickle, only with
  `allow_pickle=True` (a pickle runs code when loaded: only for files you trust).
- SPROUT: one row per prompt with a record per model (`score`, `num_input_tokens`,
  `num_output_tokens`), as JSON lines or Parquet; or the long form, one row per (prompt, model).
- RouteLLM: per-category CSVs with `prompt` and one True/False correctness column per model; the file
  name without `.csv` (e.g. `mmlu_anatomy`) is the category.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moekit.llmroute.deps import require
from moekit.llmroute.prices import PriceTable, estimate_tokens
from moekit.llmroute.table import RoutingTable

FORMATS = ("routellm", "routerbench", "sprout")


def load_table(
    path: str | Path,
    *,
    format: str,
    prices: PriceTable | None = None,
    output_tokens: int = 16,
    allow_pickle: bool = False,
) -> RoutingTable:
    """Load a routing table from `path` in one of `FORMATS`."""
    if format == "routellm":
        return load_routellm(path, prices=prices, output_tokens=output_tokens)
    if format == "routerbench":
        return load_routerbench(path, allow_pickle=allow_pickle)
    if format == "sprout":
        return load_sprout(path, prices=prices)
    raise ValueError(f"unknown data format {format!r}; known: {list(FORMATS)}")


def _read_rows(path: Path, *, allow_pickle: bool = False) -> list[dict]:
    """Rows of a CSV, JSON lines, Parquet or (with allow_pickle) pickle file as dicts."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of row objects, found {type(data).__name__}")
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".parquet":
        require("pyarrow")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".pkl", ".pickle"):
        if not allow_pickle:
            raise PermissionError(
                f"{path} is a pickle, which runs code when loaded; refusing to load it. "
                "Convert it to Parquet/CSV, or pass --allow-pickle (allow_pickle=True) only for a file you trust"
            )
        pd = require("pandas")
        return pd.read_pickle(path).to_dict(orient="records")
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .csv, .jsonl, .json, .parquet or .pkl")


def _as_quality(value: object, where: str) -> float:
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("true", "false"):
            return 1.0 if s == "true" else 0.0
        try:
            value = float(s)
        except ValueError:
            raise ValueError(f"{where}: expected True/False or a number, found {value!r}") from None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected True/False or a number, found {value!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"{where}: expected a finite quality, found {value!r}")
    return v


def load_routellm(
    path: str | Path | Iterable[str | Path],
    *,
    prices: PriceTable | None = None,
    output_tokens: int = 16,
    models: list[str] | None = None,
) -> RoutingTable:
    """RouteLLM correctness CSVs: a folder of them, one file, or a list of files; the file stem is the category.

    Cost per answer = price table x (estimated prompt tokens, `output_tokens` completion tokens).
    """
    if output_tokens < 0:
        raise ValueError(f"output_tokens: expected >= 0, found {output_tokens}")
    if isinstance(path, str | Path):
        p = Path(path)
        files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"{p}: expected RouteLLM CSV files (*.csv), found none")
    else:
        files = [Path(f) for f in path]
    prices = prices or PriceTable.default()
    queries: list[str] = []
    cats: list[str] = []
    qual: list[list[float]] = []
    for f in files:
        rows = _read_rows(f)
        if not rows:
            continue
        cols = list(rows[0].keys())
        if "prompt" not in cols:
            raise ValueError(f"{f}: expected a 'prompt' column, found columns {cols}")
        file_models = [c for c in cols if c != "prompt"]
        if models is None:
            models = file_models
        elif sorted(file_models) != sorted(models):
            raise ValueError(f"{f}: expected model columns {models}, found {file_models}")
        for i, r in enumerate(rows):
            queries.append(r["prompt"])
            cats.append(f.stem)
            qual.append([_as_quality(r[m], f"{f} row {i + 2} column {m!r}") for m in models])
    if not queries or models is None:
        raise ValueError(f"{path}: no rows found")
    quality = np.asarray(qual)
    cost = np.zeros_like(quality)
    for j, m in enumerate(models):
        p = prices.get(m)
        cost[:, j] = [(estimate_tokens(q) * p.input + output_tokens * p.output) / 1e6 for q in queries]
    return RoutingTable(queries, list(models), quality, cost, cats)


def load_routerbench(path: str | Path, *, allow_pickle: bool = False) -> RoutingTable:
    """RouterBench's table: `prompt`, `eval_name` (category), `<model>` quality and `<model>|total_cost`."""
    path = Path(path)
    rows = _read_rows(path, allow_pickle=allow_pickle)
    if not rows:
        raise ValueError(f"{path}: no rows found")
    cols = list(rows[0].keys())
    missing = [c for c in ("prompt", "eval_name") if c not in cols]
    if missing:
        raise ValueError(f"{path}: expected columns 'prompt' and 'eval_name', missing {missing}; found {cols}")
    models = [c for c in cols if "|" not in c and f"{c}|total_cost" in cols]
    if not models:
        raise ValueError(f"{path}: expected model columns '<model>' with '<model>|total_cost', found {cols}")
    quality = np.asarray([[_as_quality(r[m], f"{path} column {m!r}") for m in models] for r in rows])
    cost = np.asarray(
        [[_as_quality(r[f"{m}|total_cost"], f"{path} column {m}|total_cost") for m in models] for r in rows]
    )
    prompts = [r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]) for r in rows]
    return RoutingTable(prompts, models, quality, cost, [str(r["eval_name"]) for r in rows])


_SPROUT_FIELDS = ("score", "num_input_tokens", "num_output_tokens")


def load_sprout(path: str | Path, *, prices: PriceTable | None = None) -> RoutingTable:
    """SPROUT's per-model records; cost = price table x the record's token counts.

    Wide form: `prompt`, optional `dataset` (category), and for each model a column holding a record
    with `score`, `num_input_tokens`, `num_output_tokens`. Long form: one row per (prompt, model) with
    columns `prompt`, `model`, `score`, `num_input_tokens`, `num_output_tokens`, optional `dataset`.
    """
    path = Path(path)
    prices = prices or PriceTable.default()
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows found")
    if "prompt" not in rows[0]:
        raise ValueError(f"{path}: expected a 'prompt' column, found {list(rows[0])}")
    if "model" in rows[0]:  # long form
        records: dict[str, dict[str, dict]] = {}
        cat_of: dict[str, str] = {}
        for r in rows:
            records.setdefault(r["prompt"], {})[r["model"]] = r
            cat_of.setdefault(r["prompt"], str(r.get("dataset", "all")))
        prompts = list(records)
        models = sorted({m for rec in records.values() for m in rec})
        per_prompt = [records[p] for p in prompts]
        cats = [cat_of[p] for p in prompts]
    else:
        models = [c for c, v in rows[0].items() if isinstance(v, dict)]
        if not models:
            raise ValueError(f"{path}: expected per-model record columns {_SPROUT_FIELDS}, found {list(rows[0])}")
        prompts = [r["prompt"] for r in rows]
        per_prompt = [{m: r[m] for m in models} for r in rows]
        cats = [str(r.get("dataset", "all")) for r in rows]
    quality = np.zeros((len(prompts), len(models)))
    cost = np.zeros_like(quality)
    for i, rec in enumerate(per_prompt):
        for j, m in enumerate(models):
            if m not in rec or not isinstance(rec[m], dict):
                raise ValueError(f"{path}: prompt {i} has no record for model {m!r}")
            missing = [k for k in _SPROUT_FIELDS if k not in rec[m]]
            if missing:
                raise ValueError(
                    f"{path}: prompt {i}, model {m!r}: expected fields {_SPROUT_FIELDS}, missing {missing}"
                )
            quality[i, j] = _as_quality(rec[m]["score"], f"{path} prompt {i} model {m!r} score")
            cost[i, j] = prices.cost(m, float(rec[m]["num_input_tokens"]), float(rec[m]["num_output_tokens"]))
    return RoutingTable(prompts, models, quality, cost, cats)
