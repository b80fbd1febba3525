"""CARROT (Somerstep et al. 2025, "CARROT: A Cost Aware Rate Optimal Router"): estimate every model's
quality and cost for the query, then pick argmax_m (1 - mu) * qhat_m - mu * chat_m (cost normalised),
sweeping mu to trade cost for quality.

Estimators here are linear probes on the embedding: logistic regression for 0/1 quality (ridge for
graded quality), ridge regression for cost."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings
from moekit.llmroute.routers.linear import fit_logistic, fit_ridge, is_binary, sigmoid
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("carrot")
class CarrotRouter(Router):
    """Args: c (float, default 1.0): inverse L2 strength of the logistic probes; l2 (float, default 1.0): ridge."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        self.binary = is_binary(table.quality)
        if self.binary:
            self.q_w, self.q_b = fit_logistic(x, table.quality, c=float(self.args.get("c", 1.0)))
        else:
            self.q_w, self.q_b = fit_ridge(x, table.quality, l2=float(self.args.get("l2", 1.0)))
        self.c_w, self.c_b = fit_ridge(x, table.cost, l2=float(self.args.get("l2", 1.0)))

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        self._check_fitted()
        x = check_embeddings(x, self.dim, "carrot.predict")
        z = x @ self.q_w + self.q_b
        q = sigmoid(z) if self.binary else np.clip(z, 0.0, 1.0)
        return Prediction(q, np.maximum(x @ self.c_w + self.c_b, 0.0))

    def state(self) -> dict[str, np.ndarray]:
        return {"q_w": self.q_w, "q_b": self.q_b, "c_w": self.c_w, "c_b": self.c_b}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.q_w, self.q_b, self.c_w, self.c_b = arrays["q_w"], arrays["q_b"], arrays["c_w"], arrays["c_b"]
        self.binary = meta["binary"]

    def meta(self) -> dict:
        return {"binary": bool(self.binary)}
