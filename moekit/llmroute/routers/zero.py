"""The Zero router (Hu et al. 2024, "RouterBench"): random mixing of single models along their convex hull.

It ignores the query. Single models are points (mean cost, mean quality) on the training data; the
upper, non-decreasing convex hull of these points is what mixing them at random achieves. For a
knob `mu`, the router targets the cost `c_max - mu * (c_max - c_min)` of the hull and, between the
two hull vertices around it, calls the dearer one with the probability that hits that cost.
"""

from __future__ import annotations

import numpy as np

from moekit.llmroute.metrics import upper_hull
from moekit.llmroute.routers.base import Embedder, Router, check_mu
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("zero")
class ZeroRouter(Router):
    """Random mixing along the single models' hull. Args: seed (int, default 0)."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        c, q = table.mean_cost(), table.mean_quality()
        self.hull = upper_hull(c, q)
        self.hull_cost = c[self.hull]
        self.hull_quality = q[self.hull]

    def mixture(self, mu: float) -> tuple[int, int, float]:
        """(cheaper model, dearer model, probability of the dearer one) at knob `mu`."""
        c = self.hull_cost
        if len(c) == 1:
            m = int(self.hull[0])
            return m, m, 0.0
        target = c[-1] - check_mu(mu) * (c[-1] - c[0])
        j = int(np.clip(np.searchsorted(c, target, side="left"), 1, len(c) - 1))
        lo, hi = c[j - 1], c[j]
        p = float(np.clip((target - lo) / (hi - lo), 0.0, 1.0))
        return int(self.hull[j - 1]), int(self.hull[j]), p

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        self._check_fitted()
        lo, hi, p = self.mixture(mu)
        draws = np.random.default_rng(self.args.get("seed", 0)).random(len(x))
        return np.where(draws < p, hi, lo)

    def strong_score(
        self, x: np.ndarray, table: RoutingTable | None = None, *, cost_aware: bool = True
    ) -> np.ndarray:
        self._check_fitted()
        return np.random.default_rng(self.args.get("seed", 0)).random(len(x))

    def state(self) -> dict[str, np.ndarray]:
        return {"hull": self.hull, "hull_cost": self.hull_cost, "hull_quality": self.hull_quality}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.hull, self.hull_cost, self.hull_quality = arrays["hull"], arrays["hull_cost"], arrays["hull_quality"]
