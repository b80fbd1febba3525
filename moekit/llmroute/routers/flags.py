"""User flags in the style of Tryage (Hari & Thomson 2023): penalties on model size, latency and cost,
written by the user per request or per deployment, added to any quality predictor's objective:
choose argmax_m (1 - mu) * (qhat_m - sum_f lambda_f * a_f(m) / max_m' a_f(m')) - mu * chat_m.
Attribute `cost` uses the predicted cost; `size` and `latency` come from `attributes`."""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router
from moekit.llmroute.routers.registry import create, register
from moekit.llmroute.table import RoutingTable

FLAGS = ("size", "latency", "cost")


@register("flags")
class FlagsRouter(Router):
    """Args: base (router name, default "knn"), base_args (dict), penalties ({flag: lambda}),
    attributes ({model: {size: ..., latency: ...}}) for the flags other than cost."""

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        pen = args.get("penalties", {})
        bad = [f for f in pen if f not in FLAGS]
        if bad:
            raise ValueError(f"flags: unknown penalties {bad}; known flags: {list(FLAGS)}")
        if any(not isinstance(v, int | float) or v < 0 for v in pen.values()):
            raise ValueError(f"flags: penalties expected numbers >= 0, found {pen}")
        self.inner = create(args.get("base", "knn"), **args.get("base_args", {}))

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        self.inner.fit(table, x, embedder=embedder)
        self._check_attributes()

    def _check_attributes(self) -> None:
        attrs = self.args.get("attributes", {})
        for f in self.args.get("penalties", {}):
            if f == "cost":
                continue
            missing = [m for m in self.models if f not in attrs.get(m, {})]
            if missing:
                raise ValueError(f"flags: penalty on {f!r} needs attributes[model][{f!r}] for models {missing}")

    def penalty(self, pred: Prediction, penalties: dict[str, float] | None = None) -> np.ndarray:
        """[Q, M] penalty subtracted from predicted quality (`penalties` overrides the saved ones)."""
        pen = self.args.get("penalties", {}) if penalties is None else penalties
        attrs = self.args.get("attributes", {})
        out = np.zeros_like(pred.quality)
        for f, lam in pen.items():
            if f == "cost":
                out += lam * pred.cost / self.cost_scale
            else:
                a = np.asarray([float(attrs[m][f]) for m in self.models])
                out += lam * (a / max(a.max(), 1e-12))[None, :]
        return out

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        pred = self.inner.predict(x, table)
        return Prediction(pred.quality - self.penalty(pred), pred.cost)

    def state(self) -> dict[str, np.ndarray]:
        return {f"inner__{k}": v for k, v in self.inner.state().items()}

    def meta(self) -> dict:
        i = self.inner
        return {
            "inner": {
                "models": i.models,
                "cost_scale": i.cost_scale,
                "dim": i.dim,
                "strong": i.strong,
                "weak": i.weak,
                "meta": i.meta(),
            }
        }

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        info = meta["inner"]
        i = self.inner
        i.models, i.cost_scale, i.dim = info["models"], info["cost_scale"], info["dim"]
        i.strong, i.weak = info["strong"], info["weak"]
        i.load_state({k[len("inner__") :]: v for k, v in arrays.items() if k.startswith("inner__")}, info["meta"])
