"""MLP quality predictor (Hu et al. 2024, "RouterBench"): a small network maps the query embedding to
every model's quality; cost per model comes from a ridge regression on the same embedding.

Trained with scikit-learn's MLPRegressor; its weights are kept as arrays and applied in numpy."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings
from moekit.llmroute.routers.linear import fit_ridge
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("mlp")
class MLPRouter(Router):
    """Args: hidden (int, default 128), l2 (float, default 1e-3), max_iter (int, default 200), seed (int, default 0)."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        from moekit.utils.deps import require

        require("sklearn")
        from sklearn.neural_network import MLPRegressor

        hidden = int(self.args.get("hidden", 128))
        net = MLPRegressor(
            hidden_layer_sizes=(hidden,),
            alpha=float(self.args.get("l2", 1e-3)),
            max_iter=int(self.args.get("max_iter", 200)),
            early_stopping=len(x) >= 50,
            random_state=int(self.args.get("seed", 0)),
        )
        net.fit(x, table.quality)
        self.weights = [w.astype(np.float32) for w in net.coefs_]
        self.biases = [b.astype(np.float32) for b in net.intercepts_]
        self.cost_w, self.cost_b = fit_ridge(x, table.cost, l2=1.0)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """[Q, D] -> [Q, M] predicted quality before clipping (same as the MLPRegressor's predict)."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        self._check_fitted()
        x = check_embeddings(x, self.dim, "mlp.predict")
        q = np.clip(self.forward(x), 0.0, 1.0)
        c = np.maximum(x @ self.cost_w + self.cost_b, 0.0)
        return Prediction(q, c)

    def state(self) -> dict[str, np.ndarray]:
        s = {f"w{i}": w for i, w in enumerate(self.weights)}
        s.update({f"b{i}": b for i, b in enumerate(self.biases)})
        s.update(cost_w=self.cost_w, cost_b=self.cost_b)
        return s

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        n = meta["layers"]
        self.weights = [arrays[f"w{i}"] for i in range(n)]
        self.biases = [arrays[f"b{i}"] for i in range(n)]
        self.cost_w, self.cost_b = arrays["cost_w"], arrays["cost_b"]

    def meta(self) -> dict:
        return {"layers": len(self.weights)}
