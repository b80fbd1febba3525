"""Two-model threshold router in the style of RouteLLM (Ong et al. 2024): estimate
P(strong better | query) and call the strong model when it is >= alpha; `calibrate` picks alpha for a
target share of strong calls. The knob `mu` is alpha.

The win probability is a logistic regression on the embedding, trained on the label
"strong model's quality > weak model's quality"."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings, check_mu
from moekit.llmroute.routers.linear import fit_logistic, sigmoid
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("threshold")
class ThresholdRouter(Router):
    """Args: c (float, default 1.0): inverse L2 strength; strong / weak (model names, default best / cheapest)."""

    threshold_two_model = True

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        y = (table.quality[:, self.strong] > table.quality[:, self.weak]).astype(float)[:, None]
        self.w, self.b = fit_logistic(x, y, c=float(self.args.get("c", 1.0)))

    def win_prob(self, x: np.ndarray, table: RoutingTable | None = None) -> np.ndarray:
        self._check_fitted()
        x = check_embeddings(x, self.dim, "threshold.win_prob")
        return sigmoid(x @ self.w[:, 0] + self.b[0])

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        mu = check_mu(mu)
        p = self.win_prob(x, table)
        out = np.full(len(x), self.weak)
        out[p >= mu] = self.strong
        return out

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        """Only the two models: quality = (1 - p, p) on (weak, strong); other models get 0."""
        p = self.win_prob(x, table)
        q = np.zeros((len(x), len(self.models)))
        q[:, self.weak], q[:, self.strong] = 1.0 - p, p
        return Prediction(q, np.zeros_like(q))

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w, "b": self.b}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.w, self.b = arrays["w"], arrays["b"]
