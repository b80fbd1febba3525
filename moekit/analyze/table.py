"""Reading traces back: a DuckDB view over the Parquet file for SQL, and numpy arrays per layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.utils.deps import require


@dataclass
class LayerRouting:
    """One layer's decisions as dense arrays, tokens in (seq, pos) order."""

    experts: np.ndarray  # [N, k] int; -1 = empty slot
    weights: np.ndarray  # [N, k] float
    seq: np.ndarray  # [N] sequence index
    token: np.ndarray  # [N] token id
    pos: np.ndarray  # [N] position in its sequence (a mixture-of-depths layer holds only the tokens it processed)


class Trace:
    """A routing trace on disk. `sql(query)` runs DuckDB SQL over the view `trace`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no trace at {self.path}")
        duckdb = require("duckdb")
        self.con = duckdb.connect()
        self.con.execute(f"CREATE VIEW trace AS SELECT * FROM read_parquet('{self.path.as_posix()}')")
        cols = [r[0] for r in self.con.execute("DESCRIBE trace").fetchall()]
        self.columns = cols
        self.label_columns = [c for c in cols if c not in _BASE]
        self.layers = [
            int(r[0]) for r in self.con.execute("SELECT DISTINCT layer FROM trace ORDER BY layer").fetchall()
        ]
        mx, slots, filled, rows = self.con.execute(
            "SELECT max(expert), max(slot), count(*) FILTER (WHERE expert >= 0), count(*) FROM trace"
        ).fetchone()
        # E from the file when the writer knew it (an expert nobody chose is still an expert), else inferred
        inferred = int(mx) + 1 if mx is not None else 0
        self.num_experts = _file_metadata(self.path).get("num_experts", inferred)
        self.slots = int(slots) + 1 if slots is not None else 0  # row width: k, or the maximum of a variable-k router
        tokens = rows // self.slots if self.slots else 0
        # measured experts per token (token-layers): the slots minus the empty ones (-1)
        self.experts_per_token = filled / tokens if tokens else 0.0
        self.variable_k = filled != rows  # some tokens use fewer experts than there are slots
        # the k that metrics parameterised by k use (affinity's top-k successors, SCH's cache of m*k experts)
        self.k = max(1, round(self.experts_per_token)) if tokens else 0
        self._layers: dict[int, LayerRouting] = {}  # per-layer arrays, read once (several metrics use them)

    def sql(self, query: str, params: list | None = None):
        """Run DuckDB SQL over the view `trace` (with `?` parameters); call .fetchall()/.fetchnumpy() on it."""
        return self.con.execute(query, params or [])

    def layer(self, layer: int) -> LayerRouting:
        """[N, k] experts and weights of one layer, rows ordered by (seq, pos) (cached)."""
        if layer not in self._layers:
            self._layers[layer] = self._read_layer(layer)
        return self._layers[layer]

    def _read_layer(self, layer: int) -> LayerRouting:
        res = self.con.execute(
            "SELECT seq, pos, token, expert, weight FROM trace WHERE layer = ? ORDER BY seq, pos, slot", [layer]
        ).fetchnumpy()
        k = self.slots
        n = len(res["seq"]) // k
        return LayerRouting(
            experts=np.asarray(res["expert"], dtype=np.int32).reshape(n, k),
            weights=np.asarray(res["weight"], dtype=np.float32).reshape(n, k),
            seq=np.asarray(res["seq"])[::k],
            token=np.asarray(res["token"])[::k],
            pos=np.asarray(res["pos"])[::k],
        )


def _file_metadata(path: Path) -> dict[str, int]:
    """Integers the trace writer stored in the Parquet footer (`moekit.num_experts`), if any."""
    pq = require("pyarrow.parquet")
    meta = pq.read_schema(str(path)).metadata or {}
    out = {}
    for key, value in meta.items():
        key = key.decode()
        if key.startswith("moekit."):
            try:
                out[key.removeprefix("moekit.")] = int(value)
            except ValueError:
                continue
    return out


_BASE = {"layer", "seq", "pos", "token", "slot", "expert", "weight", "p_top1", "entropy", "out_absmax"}


def write_trace(rows: dict[str, np.ndarray | list], path: str | Path, num_experts: int | None = None) -> Path:
    """Write a hand-built trace (tests, imports from other tools). Missing optional columns are filled;
    `num_experts` records E (else readers take the largest expert id + 1)."""
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    n = len(rows["expert"])
    defaults = {
        "weight": np.ones(n, np.float32),
        "p_top1": np.full(n, np.nan, np.float32),
        "entropy": np.full(n, np.nan, np.float32),
        "out_absmax": np.full(n, np.nan, np.float32),
        "token": np.zeros(n, np.int32),
    }
    cols = {**defaults, **rows}
    types = {
        "layer": pa.int16(),
        "seq": pa.int32(),
        "pos": pa.int32(),
        "token": pa.int32(),
        "slot": pa.int8(),
        "expert": pa.int16(),
        "weight": pa.float32(),
        "p_top1": pa.float32(),
        "entropy": pa.float32(),
        "out_absmax": pa.float32(),
    }
    table = pa.table(
        {
            c: pa.array(np.asarray(v), types.get(c)) if c in types else pa.array([str(x) for x in v])
            for c, v in cols.items()
        }
    )
    if num_experts is not None:
        table = table.replace_schema_metadata({"moekit.num_experts": str(num_experts)})
    pq.write_table(table, str(path))
    return Path(path)
