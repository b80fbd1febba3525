"""The metrics routing papers report, on plain arrays (see docs/llmroute.md for the formulas).

Two models, weak w and strong s, `Q` queries:
- PGR (performance gap recovered, RouteLLM): (q_router - q_weak) / (q_strong - q_weak).
- PGR curve: send the `n` queries with the highest router score to s, the rest to w, for n = 0..Q;
  share c = n / Q. APGR = integral of PGR over c in [0, 1] (trapezoids on the Q + 1 exact points).
- CPT(x): the smallest share of strong calls whose PGR is >= x.
- Cost cut at a quality target: 1 - (cost of the cheapest operating point reaching the target) /
  (cost of calling s for every query).
Any number of models, points (cost, quality) from a sweep of the trade-off:
- AIQ (RouterBench): area under the non-decreasing upper convex hull of the points over
  [c_min, c_max], divided by (c_max - c_min).
- Pareto frontier: the points no other point beats on both cost and quality.
- Audit: share of each category's queries sent to each model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pgr(q_router: float, q_weak: float, q_strong: float) -> float:
    """Performance gap recovered: (q_router - q_weak) / (q_strong - q_weak)."""
    gap = q_strong - q_weak
    if abs(gap) < 1e-12:
        raise ValueError(f"PGR: undefined when strong and weak quality are equal (both {q_strong})")
    return (q_router - q_weak) / gap


@dataclass
class PGRCurve:
    """A router's exact two-model curve: arrays of Q + 1 operating points (n = 0..Q strong calls)."""

    share: np.ndarray  # [Q+1] share of queries sent to the strong model, n / Q
    quality: np.ndarray  # [Q+1] mean quality at that share
    cost: np.ndarray  # [Q+1] mean cost per query at that share
    pgr: np.ndarray  # [Q+1] PGR at that share
    q_weak: float  # mean quality of the weak model alone
    q_strong: float  # mean quality of the strong model alone
    c_strong: float  # mean cost per query of the strong model alone (all-strong cost)


def pgr_curve(
    score: np.ndarray,
    q_weak: np.ndarray,
    q_strong: np.ndarray,
    c_weak: np.ndarray | None = None,
    c_strong: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> PGRCurve:
    """PGR, quality and cost at every share of strong calls, ranking queries by `score` (high -> strong).

    Equal scores are ordered at random (seeded), so a constant router behaves like the random one.
    Shapes: all [Q]; costs default to 0 (weak) and 1 (strong) per query.
    """
    score = np.asarray(score, float)
    qw, qs = np.asarray(q_weak, float), np.asarray(q_strong, float)
    n = len(score)
    if n == 0 or qw.shape != (n,) or qs.shape != (n,):
        raise ValueError(
            f"pgr_curve: expected score, q_weak, q_strong of one shape [Q>0], found "
            f"{score.shape}, {qw.shape}, {qs.shape}"
        )
    cw = np.zeros(n) if c_weak is None else np.asarray(c_weak, float)
    cs = np.ones(n) if c_strong is None else np.asarray(c_strong, float)
    tie = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tie, -score))  # highest score first, ties at random
    gain = np.concatenate([[0.0], np.cumsum((qs - qw)[order])])
    extra = np.concatenate([[0.0], np.cumsum((cs - cw)[order])])
    quality = (qw.sum() + gain) / n
    cost = (cw.sum() + extra) / n
    q_w, q_s = float(qw.mean()), float(qs.mean())
    return PGRCurve(
        share=np.arange(n + 1) / n,
        quality=quality,
        cost=cost,
        pgr=(quality - q_w) / _gap(q_w, q_s),
        q_weak=q_w,
        q_strong=q_s,
        c_strong=float(cs.mean()),
    )


def _gap(q_w: float, q_s: float) -> float:
    if abs(q_s - q_w) < 1e-12:
        raise ValueError(f"PGR: undefined when strong and weak quality are equal (both {q_s})")
    return q_s - q_w


def apgr(curve: PGRCurve) -> float:
    """Average PGR: the area under PGR over the share of strong calls in [0, 1] (trapezoid rule)."""
    return float(np.trapezoid(curve.pgr, curve.share))


def cpt(curve: PGRCurve, x: float) -> float:
    """Call-performance threshold CPT(x): the smallest share of strong calls with PGR >= x (x = 0.5 for 50%)."""
    hit = np.flatnonzero(curve.pgr >= x - 1e-12)
    if len(hit) == 0:
        return float("nan")
    return float(curve.share[hit[0]])


def cheapest_reaching(cost: np.ndarray, quality: np.ndarray, target: float) -> float:
    """The lowest cost among operating points whose quality is >= target (nan when none is)."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    ok = quality >= target - 1e-12
    return float(cost[ok].min()) if ok.any() else float("nan")


def cost_cut(cost: np.ndarray, quality: np.ndarray, target: float, reference_cost: float) -> float:
    """1 - (cheapest cost reaching `target` quality) / `reference_cost` (nan when the target is never reached)."""
    if reference_cost <= 0:
        raise ValueError(f"cost_cut: expected a reference cost > 0, found {reference_cost}")
    return 1.0 - cheapest_reaching(cost, quality, target) / reference_cost


def upper_hull(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the points on the non-decreasing upper convex hull, by increasing cost.

    It starts at the cheapest point (the best quality among the cheapest) and ends at the first point of
    best quality; between vertices, randomly mixing the two operating points achieves the chord.
    """
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    if cost.shape != quality.shape or cost.ndim != 1 or len(cost) == 0:
        raise ValueError(
            f"upper_hull: expected cost and quality of one shape [N>0], found {cost.shape}, {quality.shape}"
        )
    order = np.lexsort((-quality, cost))  # by cost, then best quality first
    best_q = quality.max()
    hull: list[int] = []
    for i in order:
        if hull and (cost[i] == cost[hull[-1]] or quality[i] <= quality[hull[-1]]):
            continue  # same cost and lower quality, or dearer and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (cost[b] - cost[a]) * (quality[i] - quality[a]) - (quality[b] - quality[a]) * (cost[i] - cost[a])
            if cross >= 0:  # b lies on or below the chord a -> i
                hull.pop()
            else:
                break
        hull.append(int(i))
        if quality[i] >= best_q:
            break
    return np.asarray(hull, dtype=np.int64)


def aiq(cost: np.ndarray, quality: np.ndarray, cost_range: tuple[float, float] | None = None) -> float:
    """Average improvement in quality (RouterBench): mean of the hull's quality over [c_min, c_max].

    The hull is `upper_hull(cost, quality)`, linear between vertices and flat beyond its ends.
    `cost_range` defaults to the points' own (min, max) cost; pass a common range to compare routers.
    """
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    h = upper_hull(cost, quality)
    hc, hq = cost[h], quality[h]
    lo, hi = cost_range if cost_range is not None else (float(cost.min()), float(cost.max()))
    if hi < lo:
        raise ValueError(f"aiq: expected cost_range (lo, hi) with lo <= hi, found {(lo, hi)}")
    if hi - lo < 1e-15:
        return float(np.interp(lo, hc, hq))
    xs = np.unique(np.concatenate([[lo, hi], hc[(hc > lo) & (hc < hi)]]))
    return float(np.trapezoid(np.interp(xs, hc, hq), xs) / (hi - lo))


def pareto_frontier(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (no other point is as cheap and as good, one strictly), by cost."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    order = np.lexsort((-quality, cost))
    keep, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            keep.append(int(i))
            best = quality[i]
    return np.asarray(keep, dtype=np.int64)


def category_audit(choice: np.ndarray, categories: list[str], n_models: int) -> tuple[list[str], np.ndarray]:
    """(sorted categories C, [C, M] share of each category's queries sent to each model; rows sum to 1)."""
    choice = np.asarray(choice)
    if len(choice) != len(categories):
        raise ValueError(f"category_audit: expected one category per choice ({len(choice)}), found {len(categories)}")
    cats = sorted(set(categories))
    labels = np.asarray(categories)
    out = np.zeros((len(cats), n_models))
    for i, c in enumerate(cats):
        picked = choice[labels == c]
        out[i] = np.bincount(picked, minlength=n_models)[:n_models] / len(picked)
    return cats, out
