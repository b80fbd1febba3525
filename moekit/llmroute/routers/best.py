"""Best single model: the one model with the best trade-off on the training data, for every query."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("best")
class BestSingleRouter(Router):
    """Predicts each model's mean training quality and cost for every query (so one model wins at each mu)."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        self.mean_quality = table.mean_quality()
        self.mean_cost = table.mean_cost()

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        self._check_fitted()
        q = len(x)
        return Prediction(np.tile(self.mean_quality, (q, 1)), np.tile(self.mean_cost, (q, 1)))

    def state(self) -> dict[str, np.ndarray]:
        return {"mean_quality": self.mean_quality, "mean_cost": self.mean_cost}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.mean_quality, self.mean_cost = arrays["mean_quality"], arrays["mean_cost"]
