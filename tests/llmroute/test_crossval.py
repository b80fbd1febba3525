"""Leave-subjects-out cross-validation, difficulty features and threshold calibration (moekit issue 22)."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.llmroute import crossval
from moekit.llmroute.calibrate import call_rate, threshold_for_rate
from moekit.llmroute.crossval import CVConfig, compare_splits, cross_validate, fold_ids, summarise
from moekit.llmroute.evaluate import evaluate
from moekit.llmroute.routers import create
from moekit.llmroute.routers.base import Prediction, Router
from moekit.llmroute.table import RoutingTable

CATS = [f"subj{i}" for i in range(6)]


def tiny_table(per_cat: int = 12, seed: int = 0) -> RoutingTable:
    """6 subjects x `per_cat` questions; the strong model wins on a random half of the questions."""
    rng = np.random.default_rng(seed)
    n = per_cat * len(CATS)
    cats = [CATS[i % len(CATS)] for i in range(n)]
    words = ["alpha", "beta", "gamma", "delta", "solve", "history", "code", "prove"]
    queries = [f"{c} " + " ".join(rng.choice(words, 4)) for c in cats]
    weak = rng.random(n) < 0.5
    strong = weak | (rng.random(n) < 0.6)
    return RoutingTable(queries, ["weak", "strong"], np.stack([weak, strong], 1), np.tile([0.1, 1.0], (n, 1)), cats)


class SpyRouter(Router):
    """Scores a question 1 when its subject was in the router's training table, else 0."""

    name = "spy"
    fits: list[set[str]] = []

    def _fit(self, table, x, *, embedder=None) -> None:
        self.seen = set(table.categories)
        SpyRouter.fits.append(self.seen)

    def predict(self, x, table=None) -> Prediction:
        seen = np.asarray([c in self.seen for c in table.categories], float)
        return Prediction(np.stack([np.zeros_like(seen), seen], 1), np.tile([0.1, 1.0], (len(seen), 1)))


@pytest.fixture
def spy(monkeypatch):
    SpyRouter.fits = []

    def make(name: str, **args):
        return SpyRouter(**args) if name == "spy" else create(name, **args)

    monkeypatch.setattr(crossval, "create", make)
    return SpyRouter


def test_subject_folds_hold_each_subject_in_one_fold():
    t = tiny_table()
    f = fold_ids(t, CVConfig(by="subject", folds=3, seed=1))
    for c in CATS:
        assert len(set(f[np.asarray(t.categories) == c])) == 1
    assert sorted(set(f)) == [0, 1, 2]
    assert np.bincount(f).tolist() == [24, 24, 24]  # 6 subjects dealt round-robin into 3 folds
    q = fold_ids(t, CVConfig(by="query", folds=4, seed=1))
    assert np.bincount(q).tolist() == [18, 18, 18, 18]


def test_held_out_subject_scored_by_router_that_never_saw_it(spy):
    t = tiny_table()
    x = cross_validate(t, [("spy", {})], config=CVConfig(by="subject", folds=3, seed=0), embedder_args={"dim": 4})
    assert len(spy.fits) == 3 and all(len(s) == 4 for s in spy.fits)  # each fit saw 2 folds = 4 subjects
    assert np.all(x["spy"][0].gain == 0.0)  # no question's subject was in its router's training data
    spy.fits = []
    y = cross_validate(t, [("spy", {})], config=CVConfig(by="query", folds=3, seed=0), embedder_args={"dim": 4})
    assert np.all(y["spy"][0].gain == 1.0)  # by question every subject is seen: the spy can tell


def test_pooled_oracle_matches_the_oracle_on_the_whole_table():
    t = tiny_table()
    x = np.zeros((len(t), 1), np.float32)
    direct = evaluate(create("oracle").fit(t, x), x, t)
    sc = cross_validate(t, [("oracle", {})], config=CVConfig(folds=3), embedder_args={"dim": 4})
    pooled = summarise(t, sc)[0]
    assert pooled.apgr == pytest.approx(direct.apgr)
    assert pooled.cost_cut == pytest.approx(direct.cost_cut)


def test_compare_splits_reports_both_splits_and_the_random_spread():
    t = tiny_table()
    rows = compare_splits(
        t, [("random", {}), ("knn", {"k": 5})], folds=3, seeds=(0, 1), embedder_args={"dim": 4}, draws=4,
        rates=(0.5,),
    )  # fmt: skip
    assert [(r["split"], r["router"]) for r in rows] == [
        ("query-cv", "random"), ("query-cv", "knn"), ("subjects-cv", "random"), ("subjects-cv", "knn")
    ]  # fmt: skip
    rnd = rows[2]
    assert rnd["apgr_std_draws"] > 0 and "apgr_std_draws" not in rows[3]
    assert abs(rnd["apgr"] - 0.5) < 0.2  # random ranks: APGR 0.5 on average
    assert abs(rnd["calibration"]["0.5"] - 0.5) < 0.15  # threshold from a held-out fold, applied to another


def test_bad_folds_error():
    t = tiny_table()
    with pytest.raises(ValueError, match="folds"):
        CVConfig(folds=1)
    with pytest.raises(ValueError, match="CVConfig.by"):
        CVConfig(by="topic")
    with pytest.raises(ValueError, match="at least 7 categories"):
        fold_ids(t, CVConfig(by="subject", folds=7))
    with pytest.raises(ValueError, match="third fold"):
        cross_validate(t, [("random", {})], config=CVConfig(folds=2), rates=(0.3,))
    with pytest.raises(ValueError, match="splits"):
        compare_splits(t, [("random", {})], folds=2, splits=("topic",))
    with pytest.raises(ValueError, match="unique labels"):
        cross_validate(t, [("random", {}), ("random", {})], config=CVConfig(folds=2))


# --- calibration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_threshold_hits_the_rate_exactly_on_its_calibration_set(rate):
    s = np.random.default_rng(0).normal(size=1000)
    assert call_rate(s, threshold_for_rate(s, rate)) == round(rate * 1000) / 1000


def test_threshold_rate_on_shifted_new_traffic_within_tolerance():
    rng = np.random.default_rng(1)
    cal, new = rng.normal(size=20000), rng.normal(loc=0.05, size=20000)
    for rate in (0.1, 0.3, 0.6):
        achieved = call_rate(new, threshold_for_rate(cal, rate))
        assert abs(achieved - rate) < 0.03  # a 0.05-sigma shift moves the rate by < 0.02
        assert achieved > rate - 0.005  # shifted up: more strong calls, not fewer


def test_threshold_bad_input():
    with pytest.raises(ValueError, match="rate"):
        threshold_for_rate(np.ones(3), 1.5)
    with pytest.raises(ValueError, match="N > 0"):
        threshold_for_rate(np.ones(0), 0.5)
    with pytest.raises(ValueError, match="finite"):
        threshold_for_rate(np.asarray([0.0, np.nan]), 0.5)


def test_cli_eval_split_subjects(tmp_path):
    import csv
    import json

    from typer.testing import CliRunner

    from moekit.cli.route import app

    t = tiny_table(per_cat=10)
    for c in CATS:
        with (tmp_path / f"mmlu_{c}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", "weak", "strong"])
            for q, cat, row in zip(t.queries, t.categories, t.quality, strict=True):
                if cat == c:
                    w.writerow([q, bool(row[0]), bool(row[1])])
    (tmp_path / "prices.yaml").write_text("weak: {input: 0.5, output: 0.5}\nstrong: {input: 10, output: 30}\n")
    runner = CliRunner()
    common = ["--prices", tmp_path / "prices.yaml", "--cache", tmp_path / "cache"]
    args = ["train", tmp_path, "--out", tmp_path / "knn", "--router", "knn", "--arg", "k=5", *common]
    args += ["--embedder-arg", "dim=4", "--embedder-arg", "difficulty=true"]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    ev = ["eval", tmp_path / "knn", "--split", "subjects", "--folds", "3", "--seeds", "0,1", "--rate", "0.5"]
    r = runner.invoke(app, [str(a) for a in [*ev, "--out", tmp_path / "ev", "--cache", tmp_path / "cache"]])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = json.loads((tmp_path / "ev" / "metrics_cv.json").read_text())
    assert {(x["split"], x["router"]) for x in rows} == {
        (s, n) for s in ("query-cv", "subjects-cv") for n in ("random", "oracle", "knn")
    }
    assert all(x["queries"] == 60 and x["seeds"] == [0, 1] for x in rows)
    assert "calibration" in next(x for x in rows if x["split"] == "subjects-cv" and x["router"] == "knn")
    r = runner.invoke(app, [str(a) for a in ["eval", tmp_path / "knn", "--split", "subjects", "--folds", "7"]])
    assert r.exit_code != 0 and "7 categories" in str(r.exception)
