"""Loaders that turn public routing datasets into a `RoutingTable`.

- RouterBench: one row per prompt, columns `prompt`, `eval_name`, `<model>` (quality) and
  `<model>|total_cost` (dollars), from Parquet or CSV — or from its pandas pickle, only with
  `allow_pickle=True` (a pickle runs code when loaded: only for files you trust).
- SPROUT: one row per prompt with a record per model (`score`, `num_input_tokens`,
  `num_output_tokens`), as JSON lines or Parquet; or the long form, one row per (prompt, model).
- RouteLLM: per-category CSVs with `prompt` and one True/False correctness column per model; the file
  name without `.csv` (e.g. `mmlu_anatomy`) is the category. Its per-benchmark response files (GSM8K's)
  add each model's answer as `<model>_response`: such columns are not models, and give answer lengths.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moekit.llmroute.prices import PriceTable, estimate_tokens
from moekit.llmroute.table import RoutingTable
from moekit.utils.deps import require

FORMATS = ("routellm", "routerbench", "sprout")


class MissingModels(ValueError):
    """The data has no column for some requested models (`missing`); `found` lists the model columns it has."""

    def __init__(self, message: str, *, missing: list[str], found: list[str]) -> None:
        super().__init__(message)
        self.missing, self.found = missing, found


def load_table(
    path: str | Path,
    *,
    format: str,
    prices: PriceTable | None = None,
    output_tokens: int = 16,
    allow_pickle: bool = False,
    models: list[str] | None = None,
) -> RoutingTable:
    """Load a routing table from `path` in one of `FORMATS`, restricted to `models` (in that order) when given."""
    if format == "routellm":
        return load_routellm(path, prices=prices, output_tokens=output_tokens, models=models)
    if format == "routerbench":
        table = load_routerbench(path, allow_pickle=allow_pickle)
    elif format == "sprout":
        table = load_sprout(path, prices=prices)
    else:
        raise ValueError(f"unknown data format {format!r}; known: {list(FORMATS)}")
    missing = [m for m in models or [] if m not in table.models]
    if missing:
        raise MissingModels(
            f"{path}: no column for models {missing}; its models: {table.models}", missing=missing, found=table.models
        )
    return table.select_models(models) if models else table


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


def short(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters (with the full length), for error messages about data cells."""
    r = repr(value)
    if len(r) <= limit:
        return r
    return f"{r[:limit]}... ({len(str(value))} characters)"


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
            raise ValueError(f"{where}: expected True/False or a number, found {short(value)}") from None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected True/False or a number, found {short(value)}") from None
    if not np.isfinite(v):
        raise ValueError(f"{where}: expected a finite quality, found {short(value)}")
    return v


def _is_correctness(value: object) -> bool | None:
    """True for a correctness value (a boolean, "True"/"False", a number in [0, 1]); None for an empty cell."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("true", "false"):
            return True
        try:
            value = float(s)
        except ValueError:
            return False
    if isinstance(value, int | float | np.integer | np.floating):
        return bool(np.isfinite(value) and 0.0 <= float(value) <= 1.0)
    return False


# Columns with an answer's length: `<model><suffix>`. Token counts first, then the answer text (ceil(chars / 4)).
LENGTH_SUFFIXES = ("_response_tokens", "_output_tokens", "_completion_tokens")
RESPONSE_SUFFIX = "_response"


def correctness_columns(rows: list[dict], columns: list[str]) -> list[str]:
    """The columns of `rows` holding per-model correctness: most non-empty cells a boolean or a number in [0, 1].

    "Most", not "all", so that a model column with a few bad cells stays a model and the check of its cells
    names them. `prompt` and answer columns (`<model>_response`, `<model>_response_tokens`, ...) never count.
    """
    out = []
    for c in columns:
        if c == "prompt" or c.endswith((RESPONSE_SUFFIX, *LENGTH_SUFFIXES)):
            continue
        kinds = [k for k in (_is_correctness(r.get(c)) for r in rows) if k is not None]
        if kinds and 2 * sum(kinds) > len(kinds):
            out.append(c)
    return out


def answer_tokens(rows: list[dict], model: str, columns: list[str], default: int, where: str) -> np.ndarray | None:
    """[R] answer length in tokens of `model` on each row, from its length or response column; None without one.

    Empty cells take `default` tokens.
    """
    for suffix in LENGTH_SUFFIXES:
        c = model + suffix
        if c in columns:
            out = np.empty(len(rows))
            for i, r in enumerate(rows):
                v = r.get(c)
                if v is None or (isinstance(v, str) and not v.strip()):
                    out[i] = default
                    continue
                try:
                    out[i] = float(v)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{where} row {i + 2} column {c!r}: expected a token count, found {short(v)}"
                    ) from None
                if not (np.isfinite(out[i]) and out[i] >= 0):
                    raise ValueError(f"{where} row {i + 2} column {c!r}: expected a count >= 0, found {short(v)}")
            return out
    c = model + RESPONSE_SUFFIX
    if c in columns:
        return np.asarray([estimate_tokens(str(r[c])) if r.get(c) else default for r in rows], dtype=float)
    return None


def load_routellm(
    path: str | Path | Iterable[str | Path],
    *,
    prices: PriceTable | None = None,
    output_tokens: int = 16,
    models: list[str] | None = None,
) -> RoutingTable:
    """RouteLLM correctness CSVs: a folder of them, one file, or a list of files; the file stem is the category.

    Model columns are found by type: most non-empty cells True/False or a number in [0, 1] (then every
    cell must be); text columns (answers) and other numbers (ids, lengths) are not models. `models` picks
    model columns by name, in that order, before any cell is checked.

    Cost per answer = price table x (prompt tokens, answer tokens). Prompt tokens: ceil(chars / 4). Answer
    tokens: from the row when the file has them — a `<model>_response_tokens`, `<model>_output_tokens` or
    `<model>_completion_tokens` count, else the `<model>_response` text (ceil(chars / 4)) — and
    `output_tokens` otherwise (and for empty cells).
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
    chosen = list(models) if models else None
    queries: list[str] = []
    cats: list[str] = []
    qual: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for f in files:
        rows = _read_rows(f)
        if not rows:
            continue
        cols = list(rows[0].keys())
        if "prompt" not in cols:
            raise ValueError(f"{f}: expected a 'prompt' column, found columns {cols}")
        if models:
            missing = [m for m in models if m not in cols]
            if missing:
                found = correctness_columns(rows, cols)
                raise MissingModels(
                    f"{f}: no column for models {missing}; correctness columns here: {found}",
                    missing=missing,
                    found=found,
                )
        else:
            found = correctness_columns(rows, cols)
            if not found:
                raise ValueError(
                    f"{f}: expected model columns of True/False or numbers in [0, 1], found none among {cols}"
                )
            if chosen is None:
                chosen = found
            elif sorted(found) != sorted(chosen):
                raise ValueError(f"{f}: expected model columns {chosen} (as in {files[0].name}), found {found}")
        assert chosen is not None
        qual.append(
            np.asarray(
                [[_as_quality(r[m], f"{f} row {i + 2} column {m!r}") for m in chosen] for i, r in enumerate(rows)],
                dtype=float,
            ).reshape(len(rows), len(chosen))
        )
        per_model = [answer_tokens(rows, m, cols, output_tokens, str(f)) for m in chosen]
        lengths.append(
            np.stack([t if t is not None else np.full(len(rows), float(output_tokens)) for t in per_model], axis=1)
        )
        queries.extend(str(r["prompt"]) for r in rows)
        cats.extend([f.stem] * len(rows))
    if not queries or chosen is None:
        raise ValueError(f"{path}: no rows found")
    quality = np.concatenate(qual)
    out_tokens = np.concatenate(lengths)  # [Q, M]
    in_tokens = np.asarray([estimate_tokens(q) for q in queries], dtype=float)  # [Q]
    cost = np.zeros_like(quality)
    for j, m in enumerate(chosen):
        p = prices.get(m)
        cost[:, j] = (in_tokens * p.input + out_tokens[:, j] * p.output) / 1e6
    return RoutingTable(queries, list(chosen), quality, cost, cats)


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
    quality = np.asarray(
        [[_as_quality(r[m], f"{path} row {i} column {m!r}") for m in models] for i, r in enumerate(rows)]
    )
    cost = np.asarray(
        [
            [_as_quality(r[f"{m}|total_cost"], f"{path} row {i} column {m}|total_cost") for m in models]
            for i, r in enumerate(rows)
        ]
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
