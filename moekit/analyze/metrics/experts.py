"""Experts that stand out: super experts and behaviour-linked experts.

Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"):
a handful of experts whose down-projection outputs carry rare but extreme outliers. Our rule on the
trace's `out_absmax` (max |expert output| per token-slot): an expert's peak is the largest value it
produced; it is flagged when its peak exceeds the `quantile` of all experts' peaks AND is at least
`ratio` times the median peak.

Behaviour-linked experts (the fTRI idea of "Mixture of Tunable Experts", 2025): experts whose
activation rate differs most between two prompt sets A and B, with a two-proportion z-test per
(layer, expert) and a Bonferroni correction over all tested experts.
"""

from __future__ import annotations

import math

import numpy as np

from moekit.analyze.table import Trace


def super_experts(trace: Trace, quantile: float = 0.995, ratio: float = 10.0) -> dict:
    """Peaks per (layer, expert) and the flagged super experts. Needs a trace captured with outputs."""
    rows = trace.sql(
        "SELECT layer, expert, max(out_absmax), quantile_cont(out_absmax, 0.5) FROM trace "
        "WHERE expert >= 0 AND NOT isnan(out_absmax) GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    if not rows:
        return {"available": False, "reason": "the trace has no expert outputs (capture with record_outputs=True)"}
    peaks = np.array([r[2] for r in rows], dtype=np.float64)
    cut = float(np.quantile(peaks, quantile))
    median = float(np.median(peaks))
    flagged = [
        {"layer": int(r[0]), "expert": int(r[1]), "peak": float(r[2]), "peak_over_median": float(r[2] / median)}
        for r in rows
        if r[2] >= cut and r[2] >= ratio * median
    ]
    return {
        "available": True,
        "threshold": cut,
        "median_peak": median,
        "super_experts": flagged,
        "peaks": [{"layer": int(r[0]), "expert": int(r[1]), "peak": float(r[2]), "median": float(r[3])} for r in rows],
    }


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of H0: equal proportions x1/n1 = x2/n2."""
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    p = (x1 + x2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def behaviour_experts(trace: Trace, column: str, a: str, b: str, alpha: float = 0.01, top: int = 10) -> dict:
    """Experts whose activation rate (share of tokens routed to them) differs between label values a and b."""
    if column not in trace.label_columns:
        raise ValueError(f"trace has no label column {column!r}; it has {trace.label_columns}")
    n = dict(
        trace.sql(
            f'SELECT "{column}", count(DISTINCT (seq, pos)) FROM trace WHERE layer = {trace.layers[0]} GROUP BY 1'
        ).fetchall()
    )
    for v in (a, b):
        if v not in n:
            raise ValueError(f"label {column}={v!r} does not occur in the trace; values: {sorted(n)}")
    rows = trace.sql(
        f'SELECT layer, expert, "{column}", count(DISTINCT (seq, pos)) FROM trace WHERE expert >= 0 '
        f'AND "{column}" IN (?, ?) GROUP BY 1, 2, 3',
        [a, b],
    ).fetchall()
    hits: dict[tuple[int, int], dict[str, int]] = {}
    for layer, e, v, c in rows:
        hits.setdefault((int(layer), int(e)), {})[v] = c
    tests = len(trace.layers) * trace.num_experts
    results = []
    for (layer, e), h in hits.items():
        xa, xb = h.get(a, 0), h.get(b, 0)
        z, p = two_proportion_p(xa, n[a], xb, n[b])
        results.append(
            {
                "layer": layer,
                "expert": e,
                "rate_a": xa / n[a],
                "rate_b": xb / n[b],
                "diff": xa / n[a] - xb / n[b],
                "z": z,
                "p": p,
                "p_bonferroni": min(1.0, p * tests),
            }
        )
    results.sort(key=lambda r: -abs(r["diff"]))
    return {
        "a": a,
        "b": b,
        "tokens": {a: n[a], b: n[b]},
        "alpha": alpha,
        "significant": [r for r in results if r["p_bonferroni"] < alpha][:top],
        "all": results,
    }
