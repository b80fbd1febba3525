"""Metrics on hand-computed tables."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.llmroute.metrics import (
    aiq,
    apgr,
    category_audit,
    cost_cut,
    cpt,
    pareto_frontier,
    pgr,
    pgr_curve,
    upper_hull,
)


def test_pgr_value_and_undefined_gap():
    assert pgr(0.7, 0.6, 0.8) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="undefined"):
        pgr(0.7, 0.6, 0.6)


@pytest.fixture
def curve():
    # q_w = [1,0,0,1], q_s = [1,1,1,0]; ranking by score: 1, 2, 0, 3 with gains +1, +1, 0, -1
    # quality(n) = [.5, .75, 1, 1, .75]; q_w = .5, q_s = .75 -> PGR = [0, 1, 2, 2, 1]
    return pgr_curve([0.1, 0.9, 0.8, 0.0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1], [10, 10, 10, 10])


def test_pgr_curve_hand_computed(curve):
    np.testing.assert_allclose(curve.share, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve.quality, [0.5, 0.75, 1.0, 1.0, 0.75])
    np.testing.assert_allclose(curve.pgr, [0, 1, 2, 2, 1])
    np.testing.assert_allclose(curve.cost, [1, 3.25, 5.5, 7.75, 10])


def test_apgr_cpt_cost_cut_hand_computed(curve):
    # trapezoids: .25 * (0.5 + 1.5 + 2 + 1.5) = 1.375
    assert apgr(curve) == pytest.approx(1.375)
    # CPT on the curve linear between points: PGR 0 -> 1 over shares 0 -> .25 reaches .5 at .125
    assert cpt(curve, 0.5) == pytest.approx(0.125)
    assert cpt(curve, 1.5) == pytest.approx(0.375)  # 1 -> 2 over .25 -> .5
    assert cpt(curve, 1.0) == pytest.approx(0.25)
    assert np.isnan(cpt(curve, 3.0))
    # target .95 * .75 = .7125: the first point reaching it costs 3.25 of 10
    assert cost_cut(curve.cost, curve.quality, 0.95 * curve.q_strong, curve.c_strong) == pytest.approx(0.675)
    assert np.isnan(cost_cut(curve.cost, curve.quality, 2.0, 10.0))
    # along the curve: quality .5 -> .75 (cost 1 -> 3.25) reaches .7125 at .85 of the way: cost 2.9125
    assert cost_cut(curve.cost, curve.quality, 0.7125, 10.0, path=True) == pytest.approx(1 - 2.9125 / 10)


def test_random_scores_give_pgr_close_to_share():
    rng = np.random.default_rng(0)
    qw, qs = rng.random(20000) < 0.6, rng.random(20000) < 0.8
    c = pgr_curve(rng.random(20000), qw, qs)
    assert c.pgr[0] == pytest.approx(0) and c.pgr[-1] == pytest.approx(1)
    assert apgr(c) == pytest.approx(0.5, abs=0.03)


def test_constant_scores_move_as_one_group_not_by_order():
    # strong helps only on the first half: a tie broken by index would look like a perfect router
    qw = np.r_[np.zeros(1000), np.ones(1000)]
    qs = np.ones(2000)
    c = pgr_curve(np.zeros(2000), qw, qs)
    np.testing.assert_allclose(c.share, [0, 1])
    assert apgr(c) == pytest.approx(0.5) and cpt(c, 0.5) == pytest.approx(0.5)


def test_tied_scores_move_together_hand_computed():
    # scores .5, .5, .9, .1; gains q_s - q_w = +1, -1, +1, +1. Threshold sweep (RouteLLM: strong iff score >= t):
    # t > .9: none; t = .9: {2}; t = .5: {2, 0, 1} at once; t = .1: all -> n = 0, 1, 3, 4 (no n = 2 point)
    c = pgr_curve([0.5, 0.5, 0.9, 0.1], [0, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [3, 3, 3, 3])
    np.testing.assert_allclose(c.share, [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(c.quality, [0.25, 0.5, 0.5, 0.75])  # q_w = .25 + cumulative gains / 4
    np.testing.assert_allclose(c.pgr, [0, 0.5, 0.5, 1])  # (q - .25) / (.75 - .25)
    np.testing.assert_allclose(c.cost, [1, 1.5, 2.5, 3])  # (4 + 2 n) / 4
    assert apgr(c) == pytest.approx(0.25 * 0.25 + 0.5 * 0.5 + 0.25 * 0.75)  # trapezoids = 0.5
    assert cpt(c, 0.75) == pytest.approx(0.875)  # .5 -> 1 between shares .75 and 1
    # the same scores in any order give the same curve (the tie is never broken by position)
    c2 = pgr_curve([0.5, 0.5, 0.9, 0.1][::-1], [0, 1, 0, 0][::-1], [1, 0, 1, 1][::-1])
    np.testing.assert_allclose(c2.pgr, c.pgr)
    with pytest.raises(ValueError, match="finite scores"):
        pgr_curve([np.nan, 1.0], [0, 1], [1, 1])


POINTS_C = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
POINTS_Q = np.array([0.5, 0.6, 0.9, 0.85, 0.95])


def test_upper_hull_hand_computed():
    # (2, .6) lies below the chord (1, .5)-(3, .9); (4, .85) is dearer and worse than (3, .9)
    assert upper_hull(POINTS_C, POINTS_Q).tolist() == [0, 2, 4]
    # a point dearer than the best one is never on the hull
    assert upper_hull([1, 2, 3], [0.5, 0.9, 0.8]).tolist() == [0, 1]


def test_aiq_hand_computed():
    # segments (1..3): mean .7 x 2 = 1.4; (3..5): mean .925 x 2 = 1.85 -> 3.25 / 4
    assert aiq(POINTS_C, POINTS_Q) == pytest.approx(0.8125)
    # flat beyond the ends: + .5 on [0, 1] and + .95 on [5, 6]
    assert aiq(POINTS_C, POINTS_Q, (0.0, 6.0)) == pytest.approx((0.5 + 3.25 + 0.95) / 6)
    with pytest.raises(ValueError, match="lo <= hi"):
        aiq(POINTS_C, POINTS_Q, (3.0, 1.0))


def test_pareto_frontier_hand_computed():
    assert pareto_frontier(POINTS_C, POINTS_Q).tolist() == [0, 1, 2, 4]


def test_category_audit_hand_computed():
    cats, shares = category_audit(np.array([1, 1, 0, 0, 1]), ["x", "x", "y", "y", "y"], 2)
    assert cats == ["x", "y"]
    np.testing.assert_allclose(shares, [[0, 1], [2 / 3, 1 / 3]])
    with pytest.raises(ValueError, match="one category per choice"):
        category_audit(np.array([0]), ["a", "b"], 2)
