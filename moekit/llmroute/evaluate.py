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
    draws: int = 1  # evaluations averaged (randomised baselines: one per seed)
    spread: dict[str, float] = field(default_factory=dict)  # metric -> standard deviation over the draws

    def row(self) -> dict[str, float | str | None]:
        """The metrics as a flat JSON-friendly dict (with `<metric>_std` and `draws` for averaged draws)."""
        out: dict[str, float | str | None] = {
            "router": self.name,
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "cost_cut_at_target": self.cost_cut,
            "aiq": self.aiq,
            "max_quality": float(np.max(self.quality)),
        }
        if self.draws > 1:
            out["draws"] = self.draws
            out.update({f"{k}_std": v for k, v in self.spread.items()})
        return out


_ROW_OF = {"apgr": "apgr", "cpt50": "cpt50", "cpt80": "cpt80", "cost_cut": "cost_cut_at_target", "aiq": "aiq"}


def mean_evaluation(evals: list[Evaluation], name: str) -> Evaluation:
    """One Evaluation holding the mean of `evals` (draws of a randomised router on one table) and each metric's
    standard deviation over them in `spread` (keys as in `row()`). Curves are averaged point by point."""
    if not evals:
        raise ValueError("mean_evaluation: expected at least one evaluation")
    shapes = {e.cost.shape for e in evals}
    if len(shapes) != 1:
        raise ValueError(f"mean_evaluation: expected draws with the same operating points, found shapes {shapes}")

    def stat(attr: str) -> tuple[float | None, float | None]:
        vals = [getattr(e, attr) for e in evals]
        if vals[0] is None:
            return None, None
        a = np.asarray(vals, float)
        return float(np.nanmean(a)), float(np.nanstd(a))

    means, spread = {}, {}
    for attr, key in _ROW_OF.items():
        means[attr], sd = stat(attr)
        if sd is not None:
            spread[key] = sd
    curve = None
    if evals[0].curve is not None:
        cs = [e.curve for e in evals]
        curve = PGRCurve(
            share=np.mean([c.share for c in cs], axis=0),
            quality=np.mean([c.quality for c in cs], axis=0),
            cost=np.mean([c.cost for c in cs], axis=0),
            pgr=np.mean([c.pgr for c in cs], axis=0),
            q_weak=cs[0].q_weak,
            q_strong=cs[0].q_strong,
            c_strong=cs[0].c_strong,
        )
    return Evaluation(
        name=name,
        cost=np.mean([e.cost for e in evals], axis=0),
        quality=np.mean([e.quality for e in evals], axis=0),
        target_quality=evals[0].target_quality,
        curve=curve,
        draws=len(evals),
        spread=spread,
        **means,
    )


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
    if len(table.models) == 2:
        # PGR and CPT count strong calls: rank by the predicted quality gain. Cost cut and AIQ count dollars:
        # rank by the router's own cost-aware switch point (the same when the router ignores cost).
        cw, cs = router.pair_costs(table)
        gain = router.strong_score(x, table, cost_aware=False)
        switch = router.strong_score(x, table, cost_aware=True)
        pair = dict(weak=w, strong=s, pair_costs=(cw, cs), name=name or router.name, target_share=target_share)
        return evaluate_scores(gain, switch, table, **pair)
    cost, quality = sweep(router, x, table, mus)
    return Evaluation(
        name=name or router.name,
        cost=cost,
        quality=quality,
        aiq=aiq(cost, quality, cost_range),
        target_quality=target,
        cost_cut=cost_cut(cost, quality, target, c_strong),
    )


def evaluate_scores(
    gain: np.ndarray,
    switch: np.ndarray,
    table: RoutingTable,
    *,
    weak: int,
    strong: int,
    pair_costs: tuple[np.ndarray, np.ndarray] | None = None,
    name: str = "router",
    target_share: float = 0.95,
) -> Evaluation:
    """The two-model metrics of precomputed scores `gain, switch: [Q]` on `table` (columns `weak`, `strong`).

    `gain` ranks queries for PGR / APGR / CPT (a router's `strong_score(cost_aware=False)`), `switch` for the
    cost cut and AIQ (`cost_aware=True`); `pair_costs` ([Q], [Q]) are the costs paid on the weak / strong
    path (default: the table's). Used by `evaluate` and by cross-validation, whose scores come from one
    router per fold and are pooled over all queries.
    """
    q_strong = float(table.quality[:, strong].mean())
    mean_cost = table.mean_cost()
    cw, cs = pair_costs if pair_costs is not None else (table.cost[:, weak], table.cost[:, strong])
    qw, qs = table.quality[:, weak], table.quality[:, strong]
    curve = pgr_curve(gain, qw, qs, cw, cs)
    by_cost = pgr_curve(switch, qw, qs, cw, cs)
    target = target_share * q_strong
    return Evaluation(
        name=name,
        cost=by_cost.cost,
        quality=by_cost.quality,
        aiq=aiq(by_cost.cost, by_cost.quality, (float(mean_cost.min()), float(mean_cost.max()))),
        target_quality=target,
        cost_cut=cost_cut(by_cost.cost, by_cost.quality, target, float(table.cost[:, strong].mean()), path=True),
        apgr=apgr(curve),
        cpt50=cpt(curve, 0.5),
        cpt80=cpt(curve, 0.8),
        curve=curve,
    )


def audit(router: Router, x: np.ndarray, table: RoutingTable, mu: float) -> tuple[list[str], np.ndarray]:
    """(categories, [C, M] share of each category sent to each model) at trade-off `mu`."""
    choice = router.route(x, mu, table)
    return category_audit(choice, table.categories, len(table.models))
