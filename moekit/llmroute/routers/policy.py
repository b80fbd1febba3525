"""Policy routing in the style of Arch-Router (Tran et al. 2025): the user writes routes — a name, a
description in plain words, and the model that serves it — and each query goes to the route whose
description is most similar to it (cosine similarity of embeddings), or to the default model when no
route is similar enough. No labels are learned; `mu` is ignored."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings, check_mu
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("policy")
class PolicyRouter(Router):
    """Args: routes (list of {name, description, model}), default (model name), min_similarity (float, 0.0)."""

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        routes = args.get("routes")
        if not isinstance(routes, list) or not routes:
            raise ValueError(
                f"policy: routes expected a non-empty list of {{name, description, model}}, found {routes!r}"
            )
        for r in routes:
            if not isinstance(r, dict) or set(r) != {"name", "description", "model"}:
                raise ValueError(f"policy: each route expected keys name, description, model; found {r!r}")
        if "default" not in args:
            raise ValueError("policy: expected default=<model name> for queries that match no route")

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        if embedder is None:
            raise ValueError("policy: fit needs the embedder (fit(table, x, embedder=...)) to embed descriptions")
        for r in self.args["routes"]:
            self._index(r["model"])
        self._index(self.args["default"])
        self.route_emb = embedder.encode([r["description"] for r in self.args["routes"]]).astype(np.float32)

    def _index(self, name: str) -> int:
        if name not in self.models:
            raise KeyError(f"policy: model {name!r} is not a model of the table; models: {self.models}")
        return self.models.index(name)

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        """quality[q, m] = best similarity of q to a route served by m (default model: min_similarity)."""
        self._check_fitted()
        x = check_embeddings(x, self.dim, "policy.predict")
        sims = x @ self.route_emb.T  # [Q, R]
        q = np.full((len(x), len(self.models)), -np.inf)
        for j, r in enumerate(self.args["routes"]):
            m = self._index(r["model"])
            q[:, m] = np.maximum(q[:, m], sims[:, j])
        d = self._index(self.args["default"])
        q[:, d] = np.maximum(q[:, d], float(self.args.get("min_similarity", 0.0)))
        q[~np.isfinite(q)] = -1.0
        return Prediction(q, np.zeros_like(q))

    def route(self, x: np.ndarray, mu: float, table: RoutingTable | None = None) -> np.ndarray:
        check_mu(mu)
        return np.argmax(self.predict(x).quality, axis=1)

    def strong_score(
        self, x: np.ndarray, table: RoutingTable | None = None, *, cost_aware: bool = True
    ) -> np.ndarray:
        q = self.predict(x).quality
        return q[:, self.strong] - q[:, self.weak]

    def matched_route(self, x: np.ndarray) -> list[str | None]:
        """Name of the route each query matched (None: sent to the default model)."""
        sims = check_embeddings(x, self.dim, "policy.matched_route") @ self.route_emb.T
        best = np.argmax(sims, axis=1)
        floor = float(self.args.get("min_similarity", 0.0))
        names = [r["name"] for r in self.args["routes"]]
        return [names[j] if sims[i, j] >= floor else None for i, j in enumerate(best)]

    def state(self) -> dict[str, np.ndarray]:
        return {"route_emb": self.route_emb}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.route_emb = arrays["route_emb"]
