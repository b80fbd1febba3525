"""The metrics routing papers report, on plain arrays (see docs/llmroute.md for the formulas).

Two models, weak w and strong s, `Q` queries:
- PGR (performance gap recovered, RouteLLM): (q_router - q_weak) / (q_strong - q_weak).
- PGR curve: sweep a threshold t over the router's scores, sending the queries with score >= t to s and
  the rest to w (RouteLLM's convention): queries with equal scores move together, so the operating points
  are n = 0 and the end of each group of tied scores (n = Q when no two scores tie); share c = n / Q.
  APGR = integral of PGR over c in [0, 1] (trapezoids on the operating points; linear between them is what
  sending a random part of a tied group achieves on average).
- CPT(x): the smallest share of strong calls at which the curve (linear between points) reaches PGR x.
- Cost cut at a quality target: 1 - (cost of the cheapest operating point reaching the target) /
  (cost of calling s for every query); on a two-model curve, points between neighbours count too.
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
    """A router's exact two-model curve: its P operating points (n = 0, then the end of each tied group of scores)."""

    share: np.ndarray  # [P] share of queries sent to the strong model, n / Q
    quality: np.ndarray  # [P] mean quality at that share
    cost: np.ndarray  # [P] mean cost per query at that share
    pgr: np.ndarray  # [P] PGR at that share
    q_weak: float  # mean quality of the weak model alone
    q_strong: float  # mean quality of the strong model alone
    c_strong: float  # mean cost per query of the strong model alone (all-strong cost)


def pgr_curve(
    score: np.ndarray,
    q_weak: np.ndarray,
    q_strong: np.ndarray,
    c_weak: np.ndarray | None = None,
    c_strong: np.ndarray | None = None,
) -> PGRCurve:
    """PGR, quality and cost as a threshold on `score` (high -> strong) sweeps from above the highest to the lowest.

    Queries with equal scores cross any threshold together, so a tied group moves to the strong model at
    once (RouteLLM's `score >= threshold`): the points are n = 0 and the end of each tied group, P <= Q + 1
    of them. A constant score gives the two points "all weak" and "all strong", and APGR 0.5, as random.
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
    if not np.all(np.isfinite(score)):
        raise ValueError("pgr_curve: expected finite scores, found NaN or inf")
    cw = np.zeros(n) if c_weak is None else np.asarray(c_weak, float)
    cs = np.ones(n) if c_strong is None else np.asarray(c_strong, float)
    order = np.argsort(-score, kind="stable")  # highest score first
    ranked = score[order]
    ends = np.concatenate([[0], np.flatnonzero(ranked[1:] != ranked[:-1]) + 1, [n]])  # [P] n at each point
    gain = np.concatenate([[0.0], np.cumsum((qs - qw)[order])])[ends]
    extra = np.concatenate([[0.0], np.cumsum((cs - cw)[order])])[ends]
    quality = (qw.sum() + gain) / n
    cost = (cw.sum() + extra) / n
    q_w, q_s = float(qw.mean()), float(qs.mean())
    return PGRCurve(
        share=ends / n,
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
    """Call-performance threshold CPT(x): the smallest share of strong calls at which PGR reaches x (x = 0.5 for
    50%), on the curve taken linear between its points (as RouteLLM interpolates); nan when never reached."""
    hit = np.flatnonzero(curve.pgr >= x - 1e-12)
    if len(hit) == 0:
        return float("nan")
    k = int(hit[0])
    if k == 0:
        return float(curve.share[0])
    p0, p1, s0, s1 = curve.pgr[k - 1], curve.pgr[k], curve.share[k - 1], curve.share[k]
    return float(s0 + (x - p0) / (p1 - p0) * (s1 - s0))


def cheapest_reaching(cost: np.ndarray, quality: np.ndarray, target: float, *, path: bool = False) -> float:
    """The lowest cost among operating points whose quality is >= target (nan when none is).

    path=True: the points are consecutive points of a curve (a threshold sweep) and the segments between
    them count too (mixing two neighbouring points, as sending a random part of a tied group does).
    """
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    ok = quality >= target - 1e-12
    best = float(cost[ok].min()) if ok.any() else float("nan")
    if path and len(cost) > 1:
        q0, q1, c0, c1 = quality[:-1], quality[1:], cost[:-1], cost[1:]
        up = (q0 < target) & (q1 >= target - 1e-12)  # segments crossing the target on the way up
        if up.any():
            t = (target - q0[up]) / (q1[up] - q0[up])
            best = float(np.nanmin([best, *(c0[up] + t * (c1[up] - c0[up]))]))
    return best


def cost_cut(
    cost: np.ndarray, quality: np.ndarray, target: float, reference_cost: float, *, path: bool = False
) -> float:
    """1 - (cheapest cost reaching `target` quality) / `reference_cost` (nan when the target is never reached).

    path=True: the points are a curve and its segments count (see `cheapest_reaching`).
    """
    if reference_cost <= 0:
        raise ValueError(f"cost_cut: expected a reference cost > 0, found {reference_cost}")
    return 1.0 - cheapest_reaching(cost, quality, target, path=path) / reference_cost


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
