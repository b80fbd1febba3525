"""kNN quality predictor (Hu et al. 2024, "RouterBench"): a query's quality and cost per model are the
means over its k most similar training queries (cosine similarity of embeddings)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


def knn_indices(x: np.ndarray, ref: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """[Q, k] indices of the k rows of `ref [N, D]` most similar (dot product) to each row of `x [Q, D]`."""
    k = min(k, len(ref))
    out = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), chunk):
        sims = x[s : s + chunk] @ ref.T  # [q, N]
        if k < len(ref):
            out[s : s + chunk] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            out[s : s + chunk] = np.arange(len(ref))[None, :]
    return out


@register("knn")
class KNNRouter(Router):
    """Args: k (int, default 40): neighbours averaged."""

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        k = args.get("k", 40)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"knn: k expected an integer >= 1, found {k!r}")
        self.k = k

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        self.ref = x.astype(np.float32)
        self.ref_quality = table.quality.astype(np.float32)
        self.ref_cost = table.cost.astype(np.float32)

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        self._check_fitted()
        x = check_embeddings(x, self.dim, "knn.predict")
        idx = knn_indices(x, self.ref, self.k)  # [Q, k]
        return Prediction(self.ref_quality[idx].mean(axis=1), self.ref_cost[idx].mean(axis=1))

    def state(self) -> dict[str, np.ndarray]:
        return {"ref": self.ref, "ref_quality": self.ref_quality, "ref_cost": self.ref_cost}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.ref, self.ref_quality, self.ref_cost = arrays["ref"], arrays["ref_quality"], arrays["ref_cost"]
