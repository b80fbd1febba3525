"""Oracle router: reads the true quality and cost of every answer (an upper bound, not deployable)."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Prediction, Router
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("oracle")
class OracleRouter(Router):
    """Predicts the truth: routing at `mu = 0` picks the cheapest of the best models for each query."""

    needs_table = True

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        if table is None:
            raise ValueError("router 'oracle' needs the true table: route(x, mu, table=...)")
        if table.models != self.models:
            raise ValueError(f"oracle: expected models {self.models}, found {table.models}")
        return Prediction(quality=table.quality, cost=table.cost)
