"""Category router: learn to tell a query's category (subject, dataset, domain) from its embedding, and
route by how each model did on each category in the training data.

quality[q, m] = sum_c P(c | q) * Qbar[c, m] and cost[q, m] = sum_c P(c | q) * Cbar[c, m], where
P(c | q) is a multinomial logistic regression on the embedding and Qbar, Cbar are each category's mean
quality and cost per model, shrunk towards the overall means with `prior` pseudo-queries. It needs the
category labels of the training table (RouteLLM's file names, RouterBench's eval_name, SPROUT's dataset);
at routing time it sees the prompt only.
"""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable


@register("category")
class CategoryRouter(Router):
    """Args: c (float, default 1.0): inverse L2 strength of the classifier; prior (float, default 20):
    pseudo-queries of shrinkage towards the overall means; max_iter (int, default 300)."""

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        from moekit.utils.deps import require

        require("sklearn")
        from sklearn.linear_model import LogisticRegression

        cats = sorted(set(table.categories))
        if len(cats) < 2:
            raise ValueError(
                f"category router: the training table has a single category {cats}, and this router learns "
                "to tell categories apart, so it needs at least 2 (RouteLLM files take the category from the "
                "file name, RouterBench from eval_name, SPROUT from dataset); choose another router"
            )
        index = {c: i for i, c in enumerate(cats)}
        y = np.asarray([index[c] for c in table.categories])
        clf = LogisticRegression(C=float(self.args.get("c", 1.0)), max_iter=int(self.args.get("max_iter", 300)))
        clf.fit(x, y)
        w, b = clf.coef_.T, clf.intercept_  # [D, C], [C]; two classes: one column, the logit of class 1
        if len(cats) == 2:
            w, b = np.hstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
        self.w, self.b = w.astype(np.float32), b.astype(np.float32)
        prior = float(self.args.get("prior", 20.0))
        counts = np.bincount(y, minlength=len(cats))[:, None]  # [C, 1]
        qsum = np.zeros((len(cats), table.quality.shape[1]))
        csum = np.zeros_like(qsum)
        np.add.at(qsum, y, table.quality)
        np.add.at(csum, y, table.cost)
        self.cat_quality = (qsum + prior * table.mean_quality()) / (counts + prior)  # [C, M]
        self.cat_cost = (csum + prior * table.mean_cost()) / (counts + prior)  # [C, M]
        self.categories = cats

    def category_probs(self, x: np.ndarray) -> np.ndarray:
        """[Q, C] P(category | query)."""
        self._check_fitted()
        z = check_embeddings(x, self.dim, "category.category_probs") @ self.w + self.b
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        p = self.category_probs(x)
        return Prediction(p @ self.cat_quality, p @ self.cat_cost)

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w, "b": self.b, "cat_quality": self.cat_quality, "cat_cost": self.cat_cost}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.w, self.b = arrays["w"], arrays["b"]
        self.cat_quality, self.cat_cost = arrays["cat_quality"], arrays["cat_cost"]
        self.categories = meta["categories"]

    def meta(self) -> dict:
        return {"categories": self.categories}
