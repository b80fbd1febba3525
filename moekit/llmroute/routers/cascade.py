"""Cascade (in the style of FrugalGPT, Chen et al. 2023): call models from cheapest to dearest and stop at
the first whose predicted confidence clears the bar; every call made is paid for.

Offline, the confidence of model m on a query is its kNN-predicted quality (the mean quality of m on the
k most similar training queries); with answers in hand a deployment would score the answer instead.
The bar is tau = 1 - mu: mu = 0 escalates to the last model unless a model is sure, mu = 1 stops at the first."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings, check_mu
from moekit.llmroute.routers.knn import knn_indices
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("cascade")
class CascadeRouter(Router):
    """Args: k (int, default 40): neighbours of the confidence estimate; order (model names, default by mean cost)."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        order = self.args.get("order")
        if order is None:
            self.order = [int(i) for i in np.argsort(table.mean_cost(), kind="stable")]
        else:
            self.order = [self._model_index(n) for n in order]
        self.ref = x.astype(np.float32)
        self.ref_quality = table.quality.astype(np.float32)

    def _model_index(self, name: str) -> int:
        if name not in self.models:
            raise KeyError(f"cascade: order names {name!r}, not a model of the table; models: {self.models}")
        return self.models.index(name)

    def confidence(self, x: np.ndarray) -> np.ndarray:
        """[Q, M] predicted quality of each model."""
        self._check_fitted()
        x = check_embeddings(x, self.dim, "cascade.confidence")
        idx = knn_indices(x, self.ref, int(self.args.get("k", 40)))
        return self.ref_quality[idx].mean(axis=1)

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        conf = self.confidence(x)
        return Prediction(conf, np.zeros_like(conf))

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        tau = 1.0 - check_mu(mu)
        conf = self.confidence(x)
        choice = np.full(len(x), self.order[-1])
        done = np.zeros(len(x), dtype=bool)
        for m in self.order[:-1]:
            stop = ~done & (conf[:, m] >= tau)
            choice[stop] = m
            done |= stop
        return choice

    def strong_score(
        self, x: np.ndarray, table: RoutingTable | None = None, *, cost_aware: bool = True
    ) -> np.ndarray:
        """Two models: escalate to strong iff conf(weak) < 1 - mu, i.e. mu < 1 - conf(weak)."""
        conf = self.confidence(x)
        return 1.0 - conf[:, self.order[0]]

    def pair_costs(self, table: RoutingTable) -> tuple[np.ndarray, np.ndarray]:
        first, last = self.order[0], self.order[-1]
        return table.cost[:, first], table.cost[:, first] + table.cost[:, last]

    def paid(self, choice: np.ndarray, table: RoutingTable) -> np.ndarray:
        total = np.zeros(len(table))
        reached = np.ones(len(table), dtype=bool)
        for m in self.order:
            total += np.where(reached, table.cost[:, m], 0.0)
            reached &= choice != m
        return total

    def state(self) -> dict[str, np.ndarray]:
        return {"ref": self.ref, "ref_quality": self.ref_quality, "order": np.asarray(self.order)}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.ref, self.ref_quality = arrays["ref"], arrays["ref_quality"]
        self.order = [int(i) for i in arrays["order"]]
