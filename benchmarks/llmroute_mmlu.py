"""Every llmroute router on RouteLLM's MMLU table (GPT-4 vs Mixtral-8x7B, 14,042 questions, 57 subjects).

Two splits: by question (random 20% test) and by subject (20% of the subjects held out). For each
router: APGR, CPT(50%), CPT(80%), the cost cut at 95% of GPT-4's accuracy, and AIQ; plots of PGR and of
cost vs quality. Routers see only the prompt text, embedded locally (TF-IDF by default).

    .venv/bin/python benchmarks/llmroute_mmlu.py [--data ../shared/data/routellm-mmlu] [--embedder tfidf]

Skips (exit 0) when the data is absent. Writes benchmarks/results/llmroute_mmlu[_<embedder>].json and plots.

Cross-validation mode (moekit issue 22): `--cv K` re-trains each router of `--routers` in K folds of questions
("query-cv", in-domain) and K folds of subjects ("subjects-cv": every question scored by a router that never
saw its subject), pools the out-of-fold scores of all 14,042 questions and computes APGR / CPT / cost cut
once, for each seed of `--seeds`; `--difficulty` appends the difficulty features to the embedding; `--rates`
calibrates thresholds on a held-out-subject fold. Writes llmroute_mmlu_<embedder>[_difficulty]_cv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.llmroute.crossval import compare_splits  # noqa: E402
from moekit.llmroute.embed import encode_cached, make_embedder  # noqa: E402
from moekit.llmroute.evaluate import evaluate, mean_evaluation  # noqa: E402
from moekit.llmroute.loaders import load_routellm  # noqa: E402
from moekit.llmroute.pipeline import DRAWS, RANDOMISED  # noqa: E402
from moekit.llmroute.plots import plot_cost_quality, plot_pgr  # noqa: E402
from moekit.llmroute.routers import create  # noqa: E402
from moekit.llmroute.table import SplitConfig, split_rows  # noqa: E402

STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
POLICY = {
    "routes": [
        {
            "name": "stem",
            "model": STRONG,
            "description": "mathematics algebra calculus equation compute the value "
            "physics chemistry statistics probability computer science program formal logic",
        },
        {
            "name": "other",
            "model": WEAK,
            "description": "history law philosophy ethics business marketing "
            "psychology sociology politics medicine nutrition geography religion",
        },
    ],
    "default": WEAK,
}
ROUTERS = [
    ("random", {}),
    ("oracle", {}),
    ("best", {}),
    ("zero", {}),
    ("threshold", {}),
    ("knn", {"k": 40}),
    ("mlp", {}),
    ("mf", {}),
    ("carrot", {}),
    ("cascade", {"k": 40}),
    ("policy", POLICY),
    ("category", {}),
    ("ensemble", {"members": [{"name": "category"}, {"name": "carrot"}]}),
]


def versions() -> dict[str, str]:
    import sklearn

    out = {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__}
    try:
        import sentence_transformers

        out["sentence-transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return out


def subject_oracle(test, by: str) -> dict:
    """A reference, not a router: rank queries by their subject's true GPT-4 - Mixtral gap on the test set.

    It is the best any router can do that knows a question's subject and nothing else about it.
    """
    from moekit.llmroute.metrics import apgr, cost_cut, cpt, pgr_curve

    cats = np.asarray(test.categories)
    gap = test.quality[:, 1] - test.quality[:, 0]
    means = {c: gap[cats == c].mean() for c in set(test.categories)}
    curve = pgr_curve(
        np.asarray([means[c] for c in cats]), test.quality[:, 0], test.quality[:, 1], test.cost[:, 0], test.cost[:, 1]
    )
    row = {
        "router": "subject-oracle (reference)",
        "apgr": apgr(curve),
        "cpt50": cpt(curve, 0.5),
        "cpt80": cpt(curve, 0.8),
        "cost_cut_at_target": cost_cut(curve.cost, curve.quality, 0.95 * curve.q_strong, curve.c_strong, path=True),
        "aiq": None,
        "max_quality": float(curve.quality.max()),
        "split": by,
        "fit_seconds": 0.0,
        "test_queries": len(test),
    }
    print(
        f"{'subj-orac':10s} {row['apgr']:6.3f} {row['cpt50']:6.3f} {row['cpt80']:6.3f} "
        f"{row['cost_cut_at_target']:7.3f}    (reference: knows each test subject's true gap)",
        flush=True,
    )
    return row


def run_split(table, by: str, embedder_name: str, cache: Path, seed: int, plot_dir: Path, tag: str) -> list[dict]:
    parts = split_rows(table, SplitConfig(by=by, test_size=0.2, seed=seed))
    train, test = table.subset(parts.train), table.subset(parts.test)
    t0 = time.perf_counter()
    emb = make_embedder(embedder_name).fit(train.queries)
    # the embedder learns from training queries only; embedding every query (no labels) is cached once
    x_all = encode_cached(emb, table.queries, cache)
    x_train, x_test = x_all[parts.train], x_all[parts.test]
    embed_s = time.perf_counter() - t0
    print(
        f"\n== split by {by}: {len(train)} train / {len(test)} test queries, "
        f"{len(set(test.categories))} test subjects; embed {embed_s:.1f} s",
        flush=True,
    )
    print(f"{'router':10s} {'APGR':>6s} {'CPT50':>6s} {'CPT80':>6s} {'cut@95':>7s} {'AIQ':>6s} {'fit s':>6s}")
    rows, evals = [], []
    for name, args in ROUTERS:
        t0 = time.perf_counter()
        if name in RANDOMISED:  # the mean of DRAWS seeded draws, as `moekit route eval` reports them
            draws = [evaluate(create(name, seed=s).fit(train, x_train), x_test, test) for s in range(DRAWS)]
            fit_s = time.perf_counter() - t0
            ev = mean_evaluation(draws, name)
        else:
            router = create(name, **args).fit(train, x_train, embedder=emb)
            fit_s = time.perf_counter() - t0
            ev = evaluate(router, x_test, test, name=name)
        evals.append(ev)
        row = ev.row() | {"split": by, "fit_seconds": fit_s, "test_queries": len(test)}
        rows.append(row)
        print(
            f"{name:10s} {ev.apgr:6.3f} {ev.cpt50:6.3f} {ev.cpt80:6.3f} {ev.cost_cut:7.3f} {ev.aiq:6.3f} {fit_s:6.1f}",
            flush=True,
        )
    rows.append(subject_oracle(test, by))
    plot_pgr(evals, plot_dir / f"llmroute_mmlu_{tag}_{by}_pgr.png", title=f"MMLU, split by {by} ({embedder_name})")
    plot_cost_quality(
        evals, test, plot_dir / f"llmroute_mmlu_{tag}_{by}_cost.png", title=f"MMLU, split by {by} ({embedder_name})"
    )
    return rows


def run_cv(table, a, tag: str, out: Path) -> int:
    """`--cv K`: in-domain and held-out-subject cross-validation, pooled over all questions."""
    spec = dict(ROUTERS)
    names = a.routers.split(",")
    unknown = [n for n in names if n not in spec]
    if unknown:
        raise SystemExit(f"--routers: unknown {unknown}; known: {list(spec)}")
    seeds = tuple(int(x) for x in a.seeds.split(","))
    rates = tuple(float(x) for x in a.rates.split(",") if x)
    emb_args = {"difficulty": True} if a.difficulty else {}
    t0 = time.perf_counter()
    rows = compare_splits(
        table,
        [(n, spec[n]) for n in names],
        folds=a.cv,
        seeds=seeds,
        embedder=a.embedder,
        embedder_args=emb_args,
        cache_dir=Path(a.cache),
        draws=DRAWS,
        rates=rates,
        randomised=RANDOMISED,
        splits=tuple(a.splits.split(",")),
        progress=lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True),
    )
    print(f"\n{'split':12s} {'router':10s} {'APGR':>6s} {'sd seed':>7s} {'sd draw':>7s} {'CPT50':>6s} {'cut@95':>7s}")
    for r in rows:
        sd_draw = f"{r['apgr_std_draws']:7.3f}" if "apgr_std_draws" in r else " " * 7
        cal = "  calib " + " ".join(f"{k}->{v:.3f}" for k, v in r.get("calibration", {}).items())
        print(
            f"{r['split']:12s} {r['router']:10s} {r['apgr']:6.3f} {r['apgr_std_seeds']:7.3f} {sd_draw} "
            f"{r['cpt50']:6.3f} {r['cost_cut_at_target']:7.3f}" + (cal if "calibration" in r else ""),
            flush=True,
        )
    suffix = "_difficulty" if a.difficulty else ""
    result = {
        "benchmark": "llmroute_mmlu_cv",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.system()}",
        "versions": versions(),
        "data": {"queries": len(table), "models": table.models, "mean_quality": table.mean_quality().tolist()},
        "embedder": a.embedder,
        "embedder_args": emb_args,
        "folds": a.cv,
        "seeds": list(seeds),
        "draws_randomised": DRAWS,
        "rates": list(rates),
        "seconds": time.perf_counter() - t0,
        "results": rows,
    }
    path = out / f"llmroute_mmlu_{tag}{suffix}_cv.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "routellm-mmlu"))
    p.add_argument("--embedder", default="tfidf", choices=["tfidf", "sentence-transformers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache", default=str(Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "llmroute")
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--cv", type=int, default=0, help="K > 1: K-fold cross-validation mode (see above)")
    p.add_argument("--routers", default="random,oracle,threshold,knn,carrot", help="--cv: routers to run")
    p.add_argument("--seeds", default="0,1", help="--cv: fold seeds")
    p.add_argument("--rates", default="0.2,0.5", help="--cv: strong-call rates to calibrate ('' for none)")
    p.add_argument("--splits", default="query,subject", help="--cv: splits to run (query: in-domain)")
    p.add_argument("--difficulty", action="store_true", help="--cv: append difficulty features to the embedding")
    a = p.parse_args()
    if not Path(a.data).is_dir():
        print(f"skip: MMLU routing data not found at {a.data} (pass --data)")
        return 0
    table = load_routellm(a.data)
    out = Path(a.out)
    tag = "tfidf" if a.embedder == "tfidf" else "minilm"
    if a.cv:
        return run_cv(table, a, tag, out)
    t0 = time.perf_counter()
    rows = []
    for by in ("query", "category"):
        rows += run_split(table, by, a.embedder, Path(a.cache), a.seed, out, tag)
    result = {
        "benchmark": "llmroute_mmlu",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.system()}",
        "versions": versions(),
        "data": {
            "queries": len(table),
            "models": table.models,
            "mean_quality": table.mean_quality().tolist(),
            "mean_cost_dollars": table.mean_cost().tolist(),
            "cost_assumption": "default list prices ($/M in, out): GPT-4-1106 10/30, Mixtral 0.6/0.6; "
            "prompt tokens = ceil(chars/4), 16 answer tokens",
        },
        "embedder": a.embedder,
        "seed": a.seed,
        "seconds": time.perf_counter() - t0,
        "results": rows,
    }
    path = out / f"llmroute_mmlu_{tag}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
