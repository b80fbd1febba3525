"""The routing table: queries x models, with a quality score and a cost for every pair.

`Q` queries, `M` models. `quality[q, m]` is how well model `m` answered query `q` (0/1 or graded in
[0, 1]); `cost[q, m]` is what that answer cost, in dollars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.utils.io import atomic_save_npz, atomic_write_text


@dataclass
class RoutingTable:
    """Queries x models with quality and cost; the data every router trains and is measured on."""

    queries: list[str]  # Q query texts (the prompt a router sees)
    models: list[str]  # M model names, in column order
    quality: np.ndarray  # [Q, M] float, quality of each model's answer (0/1 or graded in [0, 1])
    cost: np.ndarray  # [Q, M] float, dollars paid for each model's answer
    categories: list[str] = field(default_factory=list)  # Q category labels (subject, dataset); [] = none

    def __post_init__(self) -> None:
        self.quality = np.asarray(self.quality, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        q, m = len(self.queries), len(self.models)
        if m < 1:
            raise ValueError("RoutingTable.models: expected at least one model, found none")
        if len(set(self.models)) != m:
            raise ValueError(f"RoutingTable.models: expected unique names, found {self.models}")
        for name, arr in (("quality", self.quality), ("cost", self.cost)):
            if arr.shape != (q, m):
                raise ValueError(f"RoutingTable.{name}: expected shape [Q={q}, M={m}], found {list(arr.shape)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"RoutingTable.{name}: expected finite values, found NaN or inf")
        if np.any(self.cost < 0):
            raise ValueError("RoutingTable.cost: expected costs >= 0, found a negative cost")
        if self.categories and len(self.categories) != q:
            raise ValueError(
                f"RoutingTable.categories: expected {q} labels (one per query) or none, found {len(self.categories)}"
            )
        if not self.categories:
            self.categories = ["all"] * q

    def __len__(self) -> int:
        return len(self.queries)

    def model_index(self, name: str) -> int:
        """Column of model `name`; raises naming the known models."""
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; the table has {self.models}")
        return self.models.index(name)

    def subset(self, rows: np.ndarray | list[int]) -> RoutingTable:
        """The table restricted to `rows` (indices into the queries)."""
        rows = np.asarray(rows, dtype=np.int64)
        return RoutingTable(
            queries=[self.queries[i] for i in rows],
            models=list(self.models),
            quality=self.quality[rows],
            cost=self.cost[rows],
            categories=[self.categories[i] for i in rows],
        )

    def select_models(self, names: list[str]) -> RoutingTable:
        """The table restricted to the models `names`, in that order."""
        cols = [self.model_index(n) for n in names]
        return RoutingTable(
            queries=list(self.queries),
            models=list(names),
            quality=self.quality[:, cols],
            cost=self.cost[:, cols],
            categories=list(self.categories),
        )

    def mean_quality(self) -> np.ndarray:
        """[M] mean quality of each model over all queries."""
        return self.quality.mean(axis=0)

    def mean_cost(self) -> np.ndarray:
        """[M] mean cost per query of each model."""
        return self.cost.mean(axis=0)

    def fingerprint(self) -> str:
        """A short hash of the queries, models, quality and cost (identifies the data for caches and splits)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.models, self.queries, self.categories]).encode())
        h.update(np.ascontiguousarray(self.quality).tobytes())
        h.update(np.ascontiguousarray(self.cost).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the table as `<path>.json` (texts) and `<path>.npz` (arrays); no pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"queries": self.queries, "models": self.models, "categories": self.categories}
        atomic_save_npz(path.with_suffix(".npz"), {"quality": self.quality, "cost": self.cost})
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> RoutingTable:
        """Read a table written by `save`."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as arrs:
            return cls(meta["queries"], meta["models"], arrs["quality"], arrs["cost"], meta["categories"])


@dataclass
class SplitConfig:
    """How to split a table into train / validation / test."""

    by: str = "query"  # "query": random queries; "category": whole categories held out (generalisation)
    test_size: float = 0.2  # share of queries (or of categories, when by="category") in the test set
    val_size: float = 0.0  # share of queries (or categories) in the validation set, taken from the rest
    seed: int = 0  # seed of the random permutation

    def __post_init__(self) -> None:
        if self.by not in ("query", "category"):
            raise ValueError(f"SplitConfig.by: expected 'query' or 'category', found {self.by!r}")
        for name in ("test_size", "val_size"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"SplitConfig.{name}: expected a share in [0, 1), found {v}")
        if self.test_size + self.val_size >= 1.0:
            raise ValueError(
                f"SplitConfig: expected test_size + val_size < 1, found {self.test_size} + {self.val_size}"
            )


@dataclass
class Split:
    """Row indices of each part of a split (indices into the original table)."""

    train: np.ndarray  # [Q_train] int
    val: np.ndarray  # [Q_val] int
    test: np.ndarray  # [Q_test] int


def split_rows(table: RoutingTable, config: SplitConfig) -> Split:
    """Split the rows of `table` by query or by category, reproducibly from `config.seed`."""
    rng = np.random.default_rng(config.seed)
    if config.by == "query":
        perm = rng.permutation(len(table))
        n_test = int(round(config.test_size * len(table)))
        n_val = int(round(config.val_size * len(table)))
        return Split(
            train=np.sort(perm[n_test + n_val :]),
            val=np.sort(perm[n_test : n_test + n_val]),
            test=np.sort(perm[:n_test]),
        )
    cats = sorted(set(table.categories))
    if len(cats) < 2:
        raise ValueError(
            f"split by category: the table has a single category {cats}, and holding out whole categories "
            "needs at least 2 (one to train on, one to test); split by query instead (--split query)"
        )
    perm = [cats[i] for i in rng.permutation(len(cats))]
    n_test = max(1, int(round(config.test_size * len(cats)))) if config.test_size > 0 else 0
    n_val = max(1, int(round(config.val_size * len(cats)))) if config.val_size > 0 else 0
    if n_test + n_val >= len(cats):
        raise ValueError(
            f"split by category: {len(cats)} categories, {n_test} held out for test and {n_val} for validation, "
            "leave none for training; lower --test-size / --val-size or split by query"
        )
    test_c, val_c = set(perm[:n_test]), set(perm[n_test : n_test + n_val])
    labels = np.asarray(table.categories)
    test = np.flatnonzero(np.isin(labels, list(test_c)))
    val = np.flatnonzero(np.isin(labels, list(val_c)))
    train = np.flatnonzero(~np.isin(labels, list(test_c | val_c)))
    return Split(train=train, val=val, test=test)
