"""Measure a fitted router on a routing table: sweep its trade-off, compute every metric of `metrics`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moekit.llmroute.metrics import PGRCurve, aiq, apgr, category_audit, cost_cut, cpt, pgr_curve
from moekit.llmroute.routers.base import Router
from moekit.llmroute.table import RoutingTable

DEFAULT_MUS = tuple(float(m) for m in np.linspace(0.0, 1.0, 41))


@dataclass
class Evaluation:
    """A router's operating points and metrics on one table."""

    name: str  # router label
    cost: np.ndarray  # [P] mean cost per query of each operating point
    quality: np.ndarray  # [P] mean quality of each operating point
    aiq: float  # RouterBench AIQ over the table's single-model cost range
    target_quality: float  # 0.95 x the strong model's mean quality (by default)
    cost_cut: float  # 1 - cheapest cost reaching target_quality / all-strong cost (nan: never reached)
    apgr: float | None = None  # two models only
    cpt50: float | None = None  # two models only: share of strong calls for PGR >= 50%
    cpt80: float | None = None  # two models only: share of strong calls for PGR >= 80%
    curve: PGRCurve | None = field(default=None, repr=False)  # two models only: the exact PGR curve

    def row(self) -> dict[str, float | str | None]:
        """The metrics as a flat JSON-friendly dict."""
        return {
            "router": self.name,
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "cost_cut_at_target": self.cost_cut,
            "aiq": self.aiq,
            "max_quality": float(np.max(self.quality)),
        }


def sweep(router: Router, x: np.ndarray, table: RoutingTable, mus=DEFAULT_MUS) -> tuple[np.ndarray, np.ndarray]:
    """([P], [P]) mean cost and mean quality of the router at each knob value in `mus`."""
    rows = np.arange(len(table))
    cost, quality = [], []
    for mu in mus:
        choice = router.route(x, mu, table)
        cost.append(router.paid(choice, table).mean())
        quality.append(table.quality[rows, choice].mean())
    return np.asarray(cost), np.asarray(quality)


def evaluate(
    router: Router,
    x: np.ndarray,
    table: RoutingTable,
    *,
    name: str | None = None,
    mus=DEFAULT_MUS,
    target_share: float = 0.95,
) -> Evaluation:
    """Every metric of `router` on `table` (queries embedded as `x: [Q, D]`).

    Two-model tables get the exact PGR curve (a threshold swept over `strong_score(cost_aware=False)`, tied
    scores moving together, see `metrics.pgr_curve`), APGR,
    CPT(50%), CPT(80%); the cost cut and AIQ come from the cost-aware ranking (the router's own trade-off),
    the cut measured at `target_share` x the strong model's mean quality, against calling it always.
    """
    if table.models != router.models:
        raise ValueError(f"evaluate: router was fitted on models {router.models}, table has {table.models}")
    s, w = router.strong, router.weak
    q_strong = float(table.quality[:, s].mean())
    c_strong = float(table.cost[:, s].mean())
    target = target_share * q_strong
    mean_cost = table.mean_cost()
    cost_range = (float(mean_cost.min()), float(mean_cost.max()))
    pair: dict = {}  # the two-model metrics
    path = False  # whether the operating points form a threshold curve (then segments between them count)
    if len(table.models) == 2:
        # PGR and CPT count strong calls: rank by the predicted quality gain. Cost cut and AIQ count dollars:
        # rank by the router's own cost-aware switch point (the same when the router ignores cost).
        cw, cs = router.pair_costs(table)
        qw, qs = table.quality[:, w], table.quality[:, s]
        curve = pgr_curve(router.strong_score(x, table, cost_aware=False), qw, qs, cw, cs)
        by_cost = pgr_curve(router.strong_score(x, table, cost_aware=True), qw, qs, cw, cs)
        cost, quality, path = by_cost.cost, by_cost.quality, True
        pair = dict(apgr=apgr(curve), cpt50=cpt(curve, 0.5), cpt80=cpt(curve, 0.8), curve=curve)
    else:
        cost, quality = sweep(router, x, table, mus)
    return Evaluation(
        name=name or router.name,
        cost=cost,
        quality=quality,
        aiq=aiq(cost, quality, cost_range),
        target_quality=target,
        cost_cut=cost_cut(cost, quality, target, c_strong, path=path),
        **pair,
    )


def audit(router: Router, x: np.ndarray, table: RoutingTable, mu: float) -> tuple[list[str], np.ndarray]:
    """(categories, [C, M] share of each category sent to each model) at trade-off `mu`."""
    choice = router.route(x, mu, table)
    return category_audit(choice, table.categories, len(table.models))
