"""Ensemble: average the quality and cost predictions of several predictor routers (stacking by mean).

Members are given by name and arguments, fitted on the same data, and saved inside the ensemble's folder.
E.g. `members=[{"name": "category"}, {"name": "carrot"}]` joins a per-category prior with per-query probes.
A member that cannot train on the table (the category router on a single-category table) is left out with
a warning naming it, and the others' weights are renormalised; when none can train, fitting fails.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from moekit.llmroute.routers.base import Embedder, Prediction, Router
from moekit.llmroute.routers.registry import create, register
from moekit.llmroute.table import RoutingTable


@register("ensemble")
class EnsembleRouter(Router):
    """Args: members (list of {name, args}), weights (list of floats, default equal)."""

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        members = args.get("members")
        if not isinstance(members, list) or not members:
            raise ValueError(f"ensemble: members expected a non-empty list of {{name, args}}, found {members!r}")
        for m in members:
            if not isinstance(m, dict) or "name" not in m or set(m) - {"name", "args"}:
                raise ValueError(f"ensemble: each member expected keys name and optional args, found {m!r}")
            if m["name"] in ("ensemble", "oracle", "random", "zero"):
                raise ValueError(f"ensemble: member {m['name']!r} does not predict quality and cost")
        weights = args.get("weights", [1.0] * len(members))
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"ensemble: weights expected {len(members)} numbers >= 0 with a positive sum, found {weights}"
            )
        self.weights = np.asarray(weights, float) / float(sum(weights))
        self.given = [create(m["name"], **m.get("args", {})) for m in members]  # every member, as given
        self.members = list(self.given)  # the members in use (those that could train)
        self.kept = list(range(len(self.given)))  # their indices in `given`

    def _fit(self, table: RoutingTable, x: np.ndarray, *, embedder: Embedder | None = None) -> None:
        kept, reasons = [], []
        for i, m in enumerate(self.given):
            try:
                m.fit(table, x, embedder=embedder)
            except ValueError as exc:  # this member cannot learn from this table
                reasons.append(f"{m.name} (member {i}): {exc}")
                continue
            kept.append(i)
        if not kept:
            raise ValueError("ensemble: no member can train on this table: " + "; ".join(reasons))
        if reasons:
            warnings.warn("ensemble: left out members that cannot train: " + "; ".join(reasons), stacklevel=2)
        self._keep(kept)

    def _keep(self, kept: list[int]) -> None:
        """Use only the members at indices `kept` of `given`, their weights renormalised."""
        w = np.asarray(self.args.get("weights", [1.0] * len(self.given)), float)[kept]
        if w.sum() <= 0:
            raise ValueError(f"ensemble: the members that could train ({kept}) all have weight 0")
        self.kept, self.members, self.weights = list(kept), [self.given[i] for i in kept], w / w.sum()

    def predict(self, x: np.ndarray, table: RoutingTable | None = None) -> Prediction:
        self._check_fitted()
        preds = [m.predict(x, table) for m in self.members]
        q = sum(w * p.quality for w, p in zip(self.weights, preds, strict=True))
        c = sum(w * p.cost for w, p in zip(self.weights, preds, strict=True))
        return Prediction(q, c)

    def state(self) -> dict[str, np.ndarray]:
        return {f"m{i}__{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def meta(self) -> dict:
        return {
            "kept": self.kept,
            "members": [
                {
                    "models": m.models,
                    "cost_scale": m.cost_scale,
                    "dim": m.dim,
                    "strong": m.strong,
                    "weak": m.weak,
                    "meta": m.meta(),
                }
                for m in self.members
            ],
        }

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if "kept" in meta:
            self._keep(meta["kept"])
        for i, (m, info) in enumerate(zip(self.members, meta["members"], strict=True)):
            m.models, m.cost_scale, m.dim = info["models"], info["cost_scale"], info["dim"]
            m.strong, m.weak = info["strong"], info["weak"]
            prefix = f"m{i}__"
            m.load_state({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}, info["meta"])
