"""`moekit route train|eval|audit|list` on small RouteLLM-style CSVs; `serve` config errors."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from moekit.cli.route import app
from tests.llmroute.synth import make_synthetic

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("routellm")
    t = make_synthetic(80, seed=2)
    prices = d / "prices.yaml"
    prices.write_text("weak: {input: 0.5, output: 0.5}\nstrong: {input: 10, output: 30}\n")
    for cat in ("math", "chat"):
        with (d / f"synthetic_{cat}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "weak", "strong"])
            for q, c, row in zip(t.queries, t.categories, t.quality, strict=True):
                if c == cat:
                    w.writerow([q, bool(row[0]), bool(row[1])])
    return d


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_train_eval_audit(data_dir, tmp_path):
    common = [
        "--prices",
        data_dir / "prices.yaml",
        "--arg",
        "k=5",
        "--cache",
        tmp_path / "cache",
        "--embedder",
        "tfidf",
    ]
    out = run(
        "train",
        data_dir,
        "--out",
        tmp_path / "knn",
        "--router",
        "knn",
        *common,
        "--calibrate-share",
        "0.5",
        "--val-size",
        "0.2",
    )
    assert "trained 'knn'" in out and "mu for 50% strong calls" in out
    info = json.loads((tmp_path / "knn" / "train.json").read_text())
    assert info["calibration"]["strong_share"] == 0.5 and 0 <= info["calibration"]["mu"] <= 1
    assert (tmp_path / "knn" / "weights.npz").exists() and (tmp_path / "knn" / "embedder" / "embedder.npz").exists()
    run(
        "train",
        data_dir,
        "--out",
        tmp_path / "thr",
        "--router",
        "threshold",
        "--prices",
        data_dir / "prices.yaml",
        "--cache",
        tmp_path / "cache",
        "--val-size",
        "0.2",
    )
    out = run("eval", tmp_path / "knn", tmp_path / "thr", "--out", tmp_path / "ev", "--cache", tmp_path / "cache")
    assert "APGR" in out and "oracle" in out and "thr" in out
    rows = {r["router"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())}
    assert set(rows) == {"random", "oracle", "best", "zero", "knn", "thr"}
    assert rows["knn"]["apgr"] > rows["random"]["apgr"] + 0.1
    for name in ("random", "zero"):  # randomised baselines: the mean and spread of 10 draws, as RouteLLM reports
        assert rows[name]["draws"] == 10 and rows[name]["apgr_std"] > 0 and "cost_cut_at_target_std" in rows[name]
    assert "draws" not in rows["oracle"] and "draws" not in rows["knn"]
    assert "±" in out  # the spread is printed
    assert (tmp_path / "ev" / "cost_quality.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "pgr.png").stat().st_size > 1000
    out = run("audit", tmp_path / "knn", "--mu", "0.1", "--cache", tmp_path / "cache")
    assert "synthetic_math" in out and "synthetic_chat" in out


def test_train_by_category_and_bad_arguments(data_dir, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            str(data_dir),
            "--out",
            str(tmp_path / "x"),
            "--router",
            "nope",
            "--prices",
            str(data_dir / "prices.yaml"),
        ],
    )
    assert result.exit_code != 0 and "known routers" in str(result.exception)
    result = runner.invoke(app, ["train", str(data_dir), "--out", str(tmp_path / "x"), "--split", "model"])
    assert result.exit_code != 0 and "SplitConfig.by" in str(result.exception)
    run(
        "train",
        data_dir,
        "--out",
        tmp_path / "cat",
        "--router",
        "carrot",
        "--split",
        "category",
        "--test-size",
        "0.5",
        "--prices",
        data_dir / "prices.yaml",
        "--cache",
        tmp_path / "cache",
    )
    info = json.loads((tmp_path / "cat" / "train.json").read_text())
    assert info["config"]["split"]["by"] == "category" and info["train_queries"] == 80


def test_list_and_serve_config_errors(tmp_path):
    out = run("list")
    assert "knn" in out and "carrot" in out and "mf" in out
    (tmp_path / "routes.yaml").write_text("backends:\n  - {model: m, base_url: 'http://x', api_key: sk-1}\n")
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "routes.yaml")])
    assert result.exit_code != 0 and "environment variable" in str(result.exception)
    assert "sk-1" not in str(result.exception)


def test_single_category_data_fails_in_one_line_saying_why(data_dir, tmp_path):
    one = data_dir / "synthetic_math.csv"  # one file: one category
    common = ["--prices", str(data_dir / "prices.yaml"), "--cache", str(tmp_path / "cache")]
    for extra, why in [(["--router", "category"], "single category"), (["--split", "category"], "--split query")]:
        result = runner.invoke(app, ["train", str(one), "--out", str(tmp_path / "x"), *common, *extra])
        assert result.exit_code != 0 and why in str(result.exception)
        assert "\n" not in str(result.exception)


def test_eval_on_another_table_matches_models_by_name(data_dir, tmp_path):
    common = ["--prices", data_dir / "prices.yaml", "--cache", tmp_path / "cache"]
    run("train", data_dir, "--out", tmp_path / "knn", "--router", "knn", "--arg", "k=5", *common)
    other = make_synthetic(20, seed=7)  # another benchmark: new queries, model columns in the other order
    with (tmp_path / "other.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "strong", "weak_response", "weak"])
        for q, row in zip(other.queries, other.quality, strict=True):
            w.writerow([q, bool(row[1]), "an answer", bool(row[0])])
    out = run("eval", tmp_path / "knn", "--data", tmp_path / "other.csv", "--out", tmp_path / "ev", *common[2:])
    assert "40 queries of" in out
    rows = {r["router"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())}
    # the same numbers as evaluating by hand on the table in the router's model order
    from moekit.llmroute.evaluate import evaluate
    from moekit.llmroute.loaders import load_routellm
    from moekit.llmroute.pipeline import load_trained
    from moekit.llmroute.prices import PriceTable

    trained = load_trained(tmp_path / "knn")
    table = load_routellm(tmp_path / "other.csv", prices=PriceTable.from_file(data_dir / "prices.yaml"))
    assert table.models == ["strong", "weak"]
    table = table.select_models(["weak", "strong"])
    ev = evaluate(trained.router, trained.embed(table.queries), table)
    assert rows["knn"]["apgr"] == pytest.approx(ev.apgr) == pytest.approx(0.75)  # perfect here: 1 - share / 2
    # a model the router knows under another name: map it; a missing one: a clear error
    text = (tmp_path / "other.csv").read_text().replace("prompt,strong,weak_response,weak", "prompt,strong,x,w7b")
    (tmp_path / "renamed.csv").write_text(text)
    result = runner.invoke(app, ["eval", str(tmp_path / "knn"), "--data", str(tmp_path / "renamed.csv")])
    assert result.exit_code != 0
    msg = str(result.exception)
    assert "no column for models ['weak']" in msg and "--model-map" in msg and "\n" not in msg
    args = ["--data", tmp_path / "renamed.csv", "--model-map", "w7b=weak", "--out", tmp_path / "ev2", *common[2:]]
    run("eval", tmp_path / "knn", *args)
    rows2 = {r["router"]: r for r in json.loads((tmp_path / "ev2" / "metrics.json").read_text())}
    assert rows2["knn"]["apgr"] == pytest.approx(ev.apgr)


def test_serve_with_an_unset_keys_variable_does_not_start(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEKIT_NO_SUCH_KEYS", raising=False)
    (tmp_path / "routes.yaml").write_text("backends:\n  - {model: m, base_url: 'http://127.0.0.1:1/v1'}\n")
    args = ["serve", "--config", str(tmp_path / "routes.yaml"), "--api-keys-env", "MOEKIT_NO_SUCH_KEYS"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "MOEKIT_NO_SUCH_KEYS is not set" in str(result.exception)
