"""Threshold calibration for a requested strong-model call rate (RouteLLM's `calibrate_threshold` idea).

A two-model router sends a query to the strong model when its score is >= a threshold t. To call the
strong model on a share r of new traffic, take t as the (1 - r) quantile of the router's scores on a
calibration set: the ceil-free rule below sends exactly n = round(r * N) of the N calibration queries
when their scores have no tie at the n-th place. On new traffic the achieved rate drifts when the score
distribution shifts (RouteLLM's users report it), so the calibration set should look like that traffic —
here, held out by subject, as new traffic brings subjects the router never saw (`crossval`).
"""

from __future__ import annotations

import numpy as np


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """The threshold t with `mean(scores >= t) == round(rate * N) / N` (exactly, when the scores at ranks n
    and n + 1 differ; tied scores cross together and the rate can overshoot). rate 0 gives a t above every
    score, rate 1 the lowest score. Shapes: scores [N > 0]."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"threshold_for_rate: expected scores of shape [N > 0], found {list(scores.shape)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("threshold_for_rate: expected finite scores, found NaN or inf")
    if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate: expected a share of strong calls in [0, 1], found {rate!r}")
    ranked = np.sort(scores)[::-1]
    n = int(round(rate * len(scores)))
    if n == 0:
        return float(np.nextafter(ranked[0], np.inf))
    return float(ranked[n - 1])


def call_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of queries whose score is >= `threshold` (sent to the strong model)."""
    scores = np.asarray(scores, np.float64)
    if len(scores) == 0:
        raise ValueError("call_rate: expected at least one score")
    return float(np.mean(scores >= threshold))
