"""The contract every query router follows, and what they share: the cost/quality decision rule and saving.

Shapes: `Q` queries, `D` embedding dimensions, `M` models.

A router sees query embeddings `X: [Q, D]` and returns, for a trade-off `mu` in [0, 1], the index of
the model to call for each query (`[Q]` ints into `models`). `mu = 0` asks for the best quality,
`mu = 1` for the lowest cost. Predictor routers estimate quality `qhat[Q, M]` and cost `chat[Q, M]`
and choose `argmax_m (1 - mu) * qhat[:, m] - mu * chat[:, m] / cost_scale`, where `cost_scale` is the
mean cost of the most expensive model on the training data (so both terms live on [0, 1]).

For two models (weak, strong), `strong_score(X)` ranks queries by how much they call for the strong
model, with `route(X, mu)` choosing strong exactly when the score is above the knob — so sweeping a
threshold over the scores traces the router's whole curve (PGR vs share of strong calls).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from moekit.llmroute.table import RoutingTable
from moekit.utils.io import atomic_save_npz, atomic_write_text

_EPS = 1e-9


class Embedder(Protocol):
    """What a router may use at fit time to embed texts of its own (e.g. route descriptions)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] embeddings of `texts`."""
        ...


@dataclass
class Prediction:
    """A predictor's estimates for each query and model."""

    quality: np.ndarray  # [Q, M] predicted quality
    cost: np.ndarray  # [Q, M] predicted cost in dollars


def check_mu(mu: float) -> float:
    if not (isinstance(mu, int | float) and 0.0 <= mu <= 1.0):
        raise ValueError(f"mu: expected a trade-off in [0, 1] (0 = best quality, 1 = lowest cost), found {mu!r}")
    return float(mu)


def check_embeddings(x: np.ndarray, dim: int | None, who: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{who}: expected embeddings of shape [Q, D], found shape {list(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{who}: expected embeddings of dimension D={dim} (as trained), found D={x.shape[1]}")
    return x


class Router:
    """Base of every router. Subclasses set `needs_table`, override `_fit` and `predict` (or `route`)."""

    name: ClassVar[str] = "router"
    needs_table: ClassVar[bool] = False  # True: routes from the true table (oracle), not from X
    threshold_two_model: ClassVar[bool] = False  # True: for 2 models, strong iff P(strong better) >= mu

    def __init__(self, **args: Any) -> None:
        self.args = dict(args)  # constructor keyword arguments (JSON-serialisable), saved with the router
        self.models: list[str] = []  # model names, set by fit
        self.cost_scale: float = 1.0  # mean cost of the most expensive training model
        self.dim: int | None = None  # embedding dimension seen at fit
        self.strong: int = 0  # index of the strong model (highest mean quality) for two-model routing
        self.weak: int = 0  # index of the weak model (cheapest other model) for two-model routing

    # --- fitting -------------------------------------------------------------------------------
    def fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> Router:
        """Learn from `table` and its query embeddings `x: [Q, D]` (rows aligned with the table)."""
        x = check_embeddings(x, None, f"{self.name}.fit")
        if len(x) != len(table):
            raise ValueError(f"{self.name}.fit: expected {len(table)} embeddings (one per query), found {len(x)}")
        self.models = list(table.models)
        self.dim = x.shape[1]
        mean_cost = table.mean_cost()
        self.cost_scale = float(max(mean_cost.max(), _EPS))
        q = table.mean_quality()
        self.strong = int(self._model_arg("strong", int(np.argmax(q))))
        others = np.where(np.arange(len(self.models)) == self.strong, np.inf, mean_cost)
        default_weak = int(np.argmin(others)) if len(self.models) > 1 else self.strong
        self.weak = int(self._model_arg("weak", default_weak))  # the cheapest model other than the strong one
        if len(self.models) > 1 and self.strong == self.weak:
            raise ValueError(
                f"{self.name}: strong and weak model are the same ({self.models[self.strong]!r}); "
                "pass different strong=/weak= model names"
            )
        self._fit(table, x, embedder=embedder)
        return self

    def _model_arg(self, key: str, default: int) -> int:
        name = self.args.get(key)
        if name is None:
            return default
        if name not in self.models:
            raise KeyError(f"{self.name}: {key}={name!r} is not a model of the table; models: {self.models}")
        return self.models.index(name)

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        """Subclass hook: learn parameters."""

    def _check_fitted(self) -> None:
        if not self.models:
            raise RuntimeError(f"router {self.name!r} is not fitted: call fit(table, x) or load a saved router")

    # --- predicting and routing ------------------------------------------------------------------
    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        """Predicted quality and cost `[Q, M]` for queries `x`."""
        raise NotImplementedError(f"router {self.name!r} does not predict quality and cost")

    def win_prob(self, x: np.ndarray, table: RoutingTable | None = None) -> np.ndarray:
        """[Q] P(strong better than weak); only for threshold-style routers."""
        raise NotImplementedError(f"router {self.name!r} has no win probability")

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        """[Q] index of the model chosen for each query at trade-off `mu`."""
        self._check_fitted()
        mu = check_mu(mu)
        if self.threshold_two_model and len(self.models) == 2:
            p = self.win_prob(x, table)
            return np.where(p >= mu, self.strong, self.weak)
        pred = self.predict(x, table)
        util = (1.0 - mu) * pred.quality - mu * pred.cost / self.cost_scale - _EPS * pred.cost / self.cost_scale
        return np.argmax(util, axis=1)

    def strong_score(self, x: np.ndarray, table: RoutingTable | None = None, *, cost_aware: bool = True) -> np.ndarray:
        """[Q] how much each query calls for the strong model (two-model routing).

        cost_aware=True: the knob at which the router switches, so route(mu) picks strong iff score > mu
        (threshold sweeps trace the router's own cost-quality curve). cost_aware=False: the predicted quality
        gain of the strong model alone — the ranking for metrics counted in strong calls (PGR, APGR, CPT).
        """
        self._check_fitted()
        if self.threshold_two_model:
            return self.win_prob(x, table)
        pred = self.predict(x, table)
        s, w = self.strong, self.weak
        dq = pred.quality[:, s] - pred.quality[:, w]
        if not cost_aware:
            return dq
        dc = (pred.cost[:, s] - pred.cost[:, w]) / self.cost_scale
        with np.errstate(divide="ignore", invalid="ignore"):
            switch = dq / (dq + np.maximum(dc, _EPS))
        score = np.where(dq > 0, switch, dq)
        return np.where((dc <= 0) & (dq >= 0), 1.0 + dq, score)

    def pair_costs(self, table: RoutingTable) -> tuple[np.ndarray, np.ndarray]:
        """([Q], [Q]) cost paid when the router ends on the weak / on the strong model."""
        return table.cost[:, self.weak], table.cost[:, self.strong]

    def paid(self, choice: np.ndarray, table: RoutingTable) -> np.ndarray:
        """[Q] dollars paid for routing each query to `choice` (a cascade also pays its earlier calls)."""
        return table.cost[np.arange(len(table)), choice]

    def calibrate(self, x: np.ndarray, share: float, table: RoutingTable | None = None) -> float:
        """The knob `mu` at which about `share` of the queries `x` go to the strong model (two models)."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share: expected a share of strong calls in [0, 1], found {share}")
        score = np.sort(self.strong_score(x, table))[::-1]
        n = int(round(share * len(score)))
        if n <= 0:
            return 1.0
        if n >= len(score):
            return 0.0
        if self.threshold_two_model:  # strong iff p >= mu: threshold at the n-th highest score
            return float(np.clip(score[n - 1], 0.0, 1.0))
        return float(np.clip(0.5 * (score[n - 1] + score[n]), 0.0, 1.0))

    # --- saving ----------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save (subclass hook)."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore arrays saved by `state` (subclass hook)."""

    def meta(self) -> dict:
        """JSON-serialisable state beyond the arrays (subclass hook)."""
        return {}

    def save(self, folder: str | Path) -> None:
        """Write `router.json` (name, args, models) and `weights.npz` into `folder`; no pickle."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {
            "name": self.name,
            "args": self.args,
            "models": self.models,
            "cost_scale": self.cost_scale,
            "dim": self.dim,
            "strong": self.strong,
            "weak": self.weak,
            "meta": self.meta(),
        }
        atomic_save_npz(folder / "weights.npz", self.state())
        atomic_write_text(folder / "router.json", json.dumps(info, indent=2))


def load_router(folder: str | Path) -> Router:
    """Load a router saved with `Router.save` (JSON + npz, never pickle)."""
    from moekit.llmroute.routers.registry import create

    folder = Path(folder)
    path = folder / "router.json"
    if not path.exists():
        raise FileNotFoundError(f"no saved router in {folder} (expected {path})")
    info = json.loads(path.read_text())
    router = create(info["name"], **info["args"])
    router.models = info["models"]
    router.cost_scale = info["cost_scale"]
    router.dim = info["dim"]
    router.strong, router.weak = info["strong"], info["weak"]
    with np.load(folder / "weights.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    router.load_state(arrays, info["meta"])
    return router
