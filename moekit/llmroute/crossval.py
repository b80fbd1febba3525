"""K-fold cross-validation of routers, by question (in-domain) or by subject (held-out subjects).

`by="subject"`: the table's categories (MMLU subjects) are shuffled and dealt into K folds; each fold's
questions are scored by a router (and an embedder) fitted on the other folds' questions only, so no
question is scored by a router that saw its subject. `by="query"`: the same with random questions
(every subject is seen in training: the in-domain number). The out-of-fold scores of all Q questions are
pooled and APGR / CPT / cost cut computed once on the union (a single held-out fold of a few subjects is
ill-posed: the weak model may nearly match the strong one there, making PGR's denominator tiny).

With `rates`, each fold also calibrates a threshold for each requested strong-call rate on a calibration
fold held out by subject (the next fold; the router for it is fitted on the remaining K - 2 folds) and
reports the rate achieved on the test fold (`calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.llmroute.calibrate import call_rate, threshold_for_rate
from moekit.llmroute.embed import encode_cached, make_embedder
from moekit.llmroute.evaluate import Evaluation, evaluate_scores, mean_evaluation
from moekit.llmroute.routers import create
from moekit.llmroute.table import RoutingTable

SPLITS = ("subject", "query")


@dataclass
class CVConfig:
    """How the rows are dealt into folds."""

    by: str = "subject"  # "subject": whole categories per fold (held out); "query": random questions (in-domain)
    folds: int = 5  # K >= 2 folds; by subject, at most the number of categories
    seed: int = 0  # seed of the shuffle

    def __post_init__(self) -> None:
        if self.by not in SPLITS:
            raise ValueError(f"CVConfig.by: expected one of {list(SPLITS)}, found {self.by!r}")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"CVConfig.folds: expected an integer >= 2, found {self.folds!r}")


def fold_ids(table: RoutingTable, config: CVConfig) -> np.ndarray:
    """[Q] fold (0..K-1) of each row. By subject, categories are shuffled then dealt round-robin, so each
    category lies in exactly one fold; by query, rows are."""
    rng = np.random.default_rng(config.seed)
    k = config.folds
    if config.by == "query":
        if k > len(table):
            raise ValueError(f"CVConfig.folds: {k} folds need at least {k} queries, the table has {len(table)}")
        out = np.empty(len(table), np.int64)
        out[rng.permutation(len(table))] = np.arange(len(table)) % k
        return out
    cats = sorted(set(table.categories))
    if k > len(cats):
        raise ValueError(
            f"CVConfig.folds: {k} folds by subject need at least {k} categories, the table has {len(cats)}"
        )
    fold_of = {cats[c]: i % k for i, c in enumerate(rng.permutation(len(cats)))}
    return np.asarray([fold_of[c] for c in table.categories], np.int64)


@dataclass
class CVScores:
    """One router's pooled out-of-fold scores over all Q questions."""

    gain: np.ndarray  # [Q] strong_score(cost_aware=False) from the router of the question's fold
    switch: np.ndarray  # [Q] strong_score(cost_aware=True)
    cost_weak: np.ndarray  # [Q] cost paid when the router ends on the weak model
    cost_strong: np.ndarray  # [Q] cost paid on the strong path
    weak: int = 0  # column of the weak model (the same in every fold)
    strong: int = 0  # column of the strong model
    calibration: dict[float, float] = field(default_factory=dict)  # requested rate -> pooled achieved rate
    calibration_folds: dict[float, list[float]] = field(default_factory=dict)  # rate -> achieved rate per fold

    def evaluation(self, table: RoutingTable, name: str) -> Evaluation:
        """APGR / CPT / cost cut computed once on the pooled scores."""
        pair = (self.cost_weak, self.cost_strong)
        return evaluate_scores(
            self.gain, self.switch, table, weak=self.weak, strong=self.strong, pair_costs=pair, name=name
        )


def _fit(name: str, args: dict, table: RoutingTable, x: np.ndarray, emb):
    return create(name, **args).fit(table, x, embedder=emb)


def cross_validate(
    table: RoutingTable,
    routers: list[tuple[str, dict]],
    *,
    config: CVConfig,
    embedder: str = "tfidf",
    embedder_args: dict | None = None,
    cache_dir: str | Path | None = None,
    draws: int = 10,
    rates: tuple[float, ...] = (),
    randomised: tuple[str, ...] = ("random", "zero"),
    labels: list[str] | None = None,
) -> dict[str, list[CVScores]]:
    """Out-of-fold scores of each router (name, args) on a two-model table: label -> [CVScores] (one per
    draw for the `randomised` routers, which are drawn `draws` times with seeds draw * 1000 + fold). Labels
    default to the router names and must be unique.

    Per fold, the embedder is fitted on the training folds' prompts and embeds the whole table once (cached
    under `cache_dir` by its fingerprint, so a fixed embedder such as sentence-transformers embeds once for
    all folds). With `rates` (needs K >= 3), each router also gets calibrated thresholds (see module doc).
    """
    if len(table.models) != 2:
        raise ValueError(f"cross_validate: expected a two-model table, found models {table.models}")
    if rates and config.folds < 3:
        raise ValueError(f"CVConfig.folds: calibration needs a third fold to calibrate on, found {config.folds}")
    labels = _labels(routers, labels)
    folds = fold_ids(table, config)
    k = config.folds
    q = len(table)
    n_draws = {lab: (draws if name in randomised else 1) for lab, (name, _) in zip(labels, routers, strict=True)}
    out = {
        lab: [CVScores(np.zeros(q), np.zeros(q), np.zeros(q), np.zeros(q)) for _ in range(n_draws[lab])]
        for lab in labels
    }
    hits: dict[str, dict[float, list[tuple[int, int]]]] = {lab: {r: [] for r in rates} for lab in labels}
    for f in range(k):
        test = np.flatnonzero(folds == f)
        train = np.flatnonzero(folds != f)
        train_t, test_t = table.subset(train), table.subset(test)
        emb = make_embedder(embedder, **(embedder_args or {})).fit(train_t.queries)
        x = encode_cached(emb, table.queries, cache_dir)
        cal_f = (f + 1) % k
        fit_rows = np.flatnonzero((folds != f) & (folds != cal_f))
        cal = np.flatnonzero(folds == cal_f)
        for lab, (name, args) in zip(labels, routers, strict=True):
            for d in range(n_draws[lab]):
                a = dict(args, seed=d * 1000 + f) if name in randomised else args
                router = _fit(name, a, train_t, x[train], emb)
                sc = out[lab][d]
                if f > 0 and (router.weak, router.strong) != (sc.weak, sc.strong):
                    raise ValueError(
                        f"{name}: the strong/weak models differ between folds; pass strong= and weak= router arguments"
                    )
                sc.weak, sc.strong = router.weak, router.strong
                tx = x[test]
                sc.gain[test] = router.strong_score(tx, test_t, cost_aware=False)
                sc.switch[test] = router.strong_score(tx, test_t, cost_aware=True)
                sc.cost_weak[test], sc.cost_strong[test] = router.pair_costs(test_t)
                if rates and d == 0:
                    cal_t = table.subset(cal)
                    r2 = _fit(name, a, table.subset(fit_rows), x[fit_rows], emb)
                    cal_s = r2.strong_score(x[cal], cal_t, cost_aware=False)
                    test_s = r2.strong_score(tx, test_t, cost_aware=False)
                    for r in rates:
                        t = threshold_for_rate(cal_s, r)
                        hits[lab][r].append((int(round(call_rate(test_s, t) * len(test))), len(test)))
    for lab in labels:
        for r in rates:
            sc = out[lab][0]
            sc.calibration[r] = sum(h for h, _ in hits[lab][r]) / q
            sc.calibration_folds[r] = [h / n for h, n in hits[lab][r]]
    return out


def _labels(routers: list[tuple[str, dict]], labels: list[str] | None) -> list[str]:
    labels = list(labels) if labels is not None else [name for name, _ in routers]
    if len(labels) != len(routers) or len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected {len(routers)} unique labels (one per router), found {labels}")
    return labels


def summarise(table: RoutingTable, scores: dict[str, list[CVScores]]) -> list[Evaluation]:
    """One pooled Evaluation per router (the mean and spread over draws for randomised routers)."""
    evals = []
    for name, runs in scores.items():
        ev = [s.evaluation(table, name) for s in runs]
        evals.append(ev[0] if len(ev) == 1 else mean_evaluation(ev, name))
    return evals


SPLIT_NAMES = {"query": "query-cv", "subject": "subjects-cv"}  # names recorded with the results
_METRICS = ("apgr", "cpt50", "cpt80", "cost_cut_at_target", "aiq")


def compare_splits(
    table: RoutingTable,
    routers: list[tuple[str, dict]],
    *,
    folds: int = 5,
    seeds: tuple[int, ...] = (0, 1),
    embedder: str = "tfidf",
    embedder_args: dict | None = None,
    cache_dir: str | Path | None = None,
    draws: int = 10,
    rates: tuple[float, ...] = (),
    randomised: tuple[str, ...] = ("random", "zero"),
    progress=None,
    labels: list[str] | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> list[dict]:
    """In-domain ("query-cv") and held-out-subject ("subjects-cv") pooled metrics of each router, side by side.

    One row per (split, router): each metric's mean over the split `seeds`, `<metric>_std_seeds` (standard
    deviation over the seeds' pooled values) and, for randomised routers, `<metric>_std_draws` (the mean
    over seeds of the standard deviation over `draws` draws). With `rates`, the held-out-subject rows also
    carry `calibration`: requested rate -> achieved rate on held-out subjects (mean over seeds).
    `progress(message)` is called before each cross-validation; `splits` limits the splits run.
    """
    labels = _labels(routers, labels)
    rows = []
    if not splits or any(b not in SPLITS for b in splits):
        raise ValueError(f"splits: expected some of {list(SPLITS)}, found {list(splits)}")
    for by in [b for b in ("query", "subject") if b in splits]:
        per: dict[str, list[Evaluation]] = {lab: [] for lab in labels}
        cal: dict[str, list[dict[float, float]]] = {lab: [] for lab in labels}
        for seed in seeds:
            if progress is not None:
                progress(f"{SPLIT_NAMES[by]}, seed {seed}: {folds} folds x {len(routers)} routers")
            sc = cross_validate(
                table,
                routers,
                config=CVConfig(by=by, folds=folds, seed=seed),
                embedder=embedder,
                embedder_args=embedder_args,
                cache_dir=cache_dir,
                draws=draws,
                rates=rates if by == "subject" else (),
                randomised=randomised,
                labels=labels,
            )
            for ev in summarise(table, sc):
                per[ev.name].append(ev)
                cal[ev.name].append(sc[ev.name][0].calibration)
        for name in labels:
            evs = [e.row() for e in per[name]]
            row: dict = {"split": SPLIT_NAMES[by], "router": name, "seeds": list(seeds), "queries": len(table)}
            for m in _METRICS:
                vals = np.asarray([r[m] for r in evs], float)
                row[m] = float(np.nanmean(vals))
                row[f"{m}_std_seeds"] = float(np.nanstd(vals))
                if f"{m}_std" in evs[0]:
                    row[f"{m}_std_draws"] = float(np.mean([r[f"{m}_std"] for r in evs]))
            if rates and by == "subject":
                row["calibration"] = {str(r): float(np.mean([c[r] for c in cal[name]])) for r in rates}
            rows.append(row)
    return rows
