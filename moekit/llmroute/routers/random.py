"""Random router: each query to a model drawn uniformly; for two models, a random ranking (PGR = share)."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Router, check_mu
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("random")
class RandomRouter(Router):
    """Ignores the query. `route` draws a model uniformly at random; `mu` is ignored.

    Args: seed (int, default 0): seed of the draws (same queries, same draws).
    """

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        self._check_fitted()
        check_mu(mu)
        rng = np.random.default_rng(self.args.get("seed", 0))
        return rng.integers(0, len(self.models), size=len(x))

    def strong_score(
        self, x: np.ndarray, table: RoutingTable | None = None, *, cost_aware: bool = True
    ) -> np.ndarray:
        self._check_fitted()
        return np.random.default_rng(self.args.get("seed", 0)).random(len(x))
