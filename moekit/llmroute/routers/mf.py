"""Matrix factorisation router (RouteLLM's `mf`, Ong et al. 2024).

Score of model m on query q: s(m, q) = w^T (v_m/||v_m|| ⊙ (P e_q)) + b_m, with learned model
embeddings v_m [d], projection P [D, d] of the query embedding e_q, and weights w [d]. Trained on
pairwise preferences (-log sigmoid(s(a, q) - s(b, q)) when a answered better than b) plus a pointwise
term (binary cross-entropy of sigmoid(s(m, q)) against the quality). For two models the win probability
is P(strong better) = sigmoid(s(strong, q) - s(weak, q)) and the knob `mu` is its threshold alpha.
Numpy with hand-written gradients and Adam.
"""

from __future__ import annotations

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router, check_embeddings
from moekit.llmroute.routers.linear import sigmoid
from moekit.llmroute.routers.registry import register
from moekit.llmroute.table import RoutingTable

_PARAMS = ("P", "V", "w", "b")


def mf_scores(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """[Q, D] -> [Q, M] scores s(m, q)."""
    h = x @ params["P"]  # [Q, d]
    vn = params["V"] / np.linalg.norm(params["V"], axis=1, keepdims=True)  # [M, d]
    return (h * params["w"]) @ vn.T + params["b"]


def mf_loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, pointwise: float, l2: float
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean loss on a batch (x [B, D], quality y [B, M]) and its gradients."""
    P, V, w, b = (params[k] for k in _PARAMS)
    B, M = y.shape
    h = x @ P  # [B, d]
    norm = np.linalg.norm(V, axis=1, keepdims=True)  # [M, 1]
    vn = V / norm  # [M, d]
    hw = h * w  # [B, d]
    s = hw @ vn.T + b  # [B, M]
    g = np.zeros_like(s)
    loss = 0.0
    if pointwise > 0:
        p = sigmoid(s)
        eps = 1e-7
        loss += pointwise * float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
        g += pointwise * (p - y) / (B * M)
    n_pairs = 0
    pair_terms = []
    for a in range(M):
        for c in range(M):
            if a == c:
                continue
            mask = y[:, a] > y[:, c]
            if mask.any():
                pair_terms.append((a, c, mask))
                n_pairs += int(mask.sum())
    for a, c, mask in pair_terms:
        d = s[mask, a] - s[mask, c]
        loss += float(np.sum(np.logaddexp(0.0, -d))) / n_pairs
        gd = (sigmoid(d) - 1.0) / n_pairs
        g[mask, a] += gd
        g[mask, c] -= gd
    loss += l2 * float(np.sum(P * P))
    grads = {"b": g.sum(0)}
    d_hw = g @ vn  # [B, d]
    d_vn = g.T @ hw  # [M, d]
    grads["w"] = np.sum(d_hw * h, axis=0)
    grads["P"] = x.T @ (d_hw * w) + 2 * l2 * P
    grads["V"] = (d_vn - vn * np.sum(d_vn * vn, axis=1, keepdims=True)) / norm
    return loss, grads


@register("mf")
class MFRouter(Router):
    """Args: dim (int, 64), epochs (int, 40), batch (int, 256), lr (float, 3e-3), l2 (float, 1e-5),
    pointwise (float, 1.0: weight of the pointwise term; 0 = pairwise only), seed (int, 0)."""

    threshold_two_model = True

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        a = self.args
        dim, epochs, batch = int(a.get("dim", 64)), int(a.get("epochs", 40)), int(a.get("batch", 256))
        lr, l2, pointwise = float(a.get("lr", 3e-3)), float(a.get("l2", 1e-5)), float(a.get("pointwise", 1.0))
        rng = np.random.default_rng(int(a.get("seed", 0)))
        D, M = x.shape[1], len(table.models)
        params = {
            "P": rng.normal(0, 1 / np.sqrt(D), (D, dim)),
            "V": rng.normal(0, 1, (M, dim)),
            "w": np.ones(dim),
            "b": np.zeros(M),
        }
        m1 = {k: np.zeros_like(v) for k, v in params.items()}
        m2 = {k: np.zeros_like(v) for k, v in params.items()}
        x64, y = x.astype(np.float64), table.quality
        step = 0
        self.losses: list[float] = []
        for _ in range(epochs):
            perm = rng.permutation(len(x64))
            total = 0.0
            for s in range(0, len(perm), batch):
                idx = perm[s : s + batch]
                loss, grads = mf_loss_and_grads(params, x64[idx], y[idx], pointwise, l2)
                total += loss * len(idx)
                step += 1
                for k in _PARAMS:
                    m1[k] = 0.9 * m1[k] + 0.1 * grads[k]
                    m2[k] = 0.999 * m2[k] + 0.001 * grads[k] ** 2
                    mh, vh = m1[k] / (1 - 0.9**step), m2[k] / (1 - 0.999**step)
                    params[k] = params[k] - lr * mh / (np.sqrt(vh) + 1e-8)
            self.losses.append(total / len(perm))
        self.params = {k: v.astype(np.float32) for k, v in params.items()}

    def scores(self, x: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return mf_scores(self.params, check_embeddings(x, self.dim, "mf.scores"))

    def win_prob(self, x: np.ndarray, table: RoutingTable | None = None) -> np.ndarray:
        s = self.scores(x)
        return sigmoid(s[:, self.strong] - s[:, self.weak])

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        """Quality = sigmoid(s(m, q)); cost = the model's mean training cost."""
        s = self.scores(x)
        return Prediction(sigmoid(s), np.tile(self.mean_cost, (len(x), 1)))

    def fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> Router:
        self.mean_cost = table.mean_cost()
        return super().fit(table, x, embedder=embedder)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.params, "mean_cost": self.mean_cost}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.params = {k: arrays[k] for k in _PARAMS}
        self.mean_cost = arrays["mean_cost"]
