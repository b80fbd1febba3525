"""Routing table, splits, prices and the loaders on small files written in each format."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from moekit.llmroute.loaders import load_routellm, load_routerbench, load_sprout, load_table
from moekit.llmroute.prices import Price, PriceTable, estimate_tokens
from moekit.llmroute.table import RoutingTable, SplitConfig, split_rows
from moekit.utils.deps import MissingDependency, available, require

PRICES = PriceTable.from_dict({"a": {"input": 1.0, "output": 2.0}, "b": {"input": 10.0, "output": 20.0}})


def small_table(n=10):
    cats = ["x"] * 4 + ["y"] * 3 + ["z"] * 3
    return RoutingTable([f"q{i}" for i in range(n)], ["a", "b"], np.zeros((n, 2)), np.ones((n, 2)), cats[:n])


def test_table_checks_shapes_and_values():
    with pytest.raises(ValueError, match=r"quality: expected shape \[Q=2, M=2\], found \[2, 3\]"):
        RoutingTable(["a", "b"], ["m", "n"], np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        RoutingTable(["a"], ["m"], [[np.nan]], [[0.0]])
    with pytest.raises(ValueError, match="negative"):
        RoutingTable(["a"], ["m"], [[1.0]], [[-1.0]])
    with pytest.raises(ValueError, match="unique"):
        RoutingTable(["a"], ["m", "m"], [[1.0, 1.0]], [[0.0, 0.0]])
    with pytest.raises(KeyError, match="the table has"):
        small_table().model_index("c")


def test_table_save_load_round_trip(tmp_path):
    t = small_table()
    t.save(tmp_path / "t")
    back = RoutingTable.load(tmp_path / "t")
    assert back.queries == t.queries and back.categories == t.categories and back.fingerprint() == t.fingerprint()


def test_split_by_query_is_a_reproducible_partition():
    t = small_table()
    s = split_rows(t, SplitConfig(by="query", test_size=0.3, val_size=0.2, seed=3))
    assert (len(s.train), len(s.val), len(s.test)) == (5, 2, 3)
    assert sorted(np.concatenate([s.train, s.val, s.test]).tolist()) == list(range(10))
    s2 = split_rows(t, SplitConfig(by="query", test_size=0.3, val_size=0.2, seed=3))
    assert s2.test.tolist() == s.test.tolist()


def test_split_by_category_holds_out_whole_categories():
    t = small_table()
    s = split_rows(t, SplitConfig(by="category", test_size=0.34, seed=0))
    test_cats = {t.categories[i] for i in s.test}
    train_cats = {t.categories[i] for i in s.train}
    assert len(test_cats) == 1 and not test_cats & train_cats
    assert len(s.train) + len(s.test) == 10
    with pytest.raises(ValueError, match="SplitConfig.by"):
        SplitConfig(by="model")
    with pytest.raises(ValueError, match="test_size"):
        SplitConfig(test_size=1.0)


def test_prices_and_token_estimate(tmp_path):
    assert estimate_tokens("x" * 9) == 3 and estimate_tokens("") == 1
    assert PRICES.cost("b", 1000, 500) == pytest.approx((1000 * 10 + 500 * 20) / 1e6)
    assert PriceTable.default().get("gpt-4-1106-preview") == Price(10.0, 30.0)
    with pytest.raises(KeyError, match="no price for model 'zz'"):
        PRICES.get("zz")
    with pytest.raises(ValueError, match="Price.input"):
        Price(-1.0, 0.0)
    (tmp_path / "p.yaml").write_text("c: {input: 3, output: 4}\n")
    assert PriceTable.from_file(tmp_path / "p.yaml").get("c") == Price(3, 4)
    (tmp_path / "bad.yaml").write_text("c: {input: 3}\n")
    with pytest.raises(ValueError, match="expected {input"):
        PriceTable.from_file(tmp_path / "bad.yaml")


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_load_routellm_csvs(tmp_path):
    write_csv(tmp_path / "mmlu_math.csv", ["prompt", "a", "b"], [["1+1?", "False", "True"], ["2+2?", "True", "True"]])
    write_csv(tmp_path / "mmlu_law.csv", ["prompt", "a", "b"], [["Is it legal?\nA. yes", "True", "False"]])
    t = load_routellm(tmp_path, prices=PRICES, output_tokens=10)
    assert t.models == ["a", "b"] and len(t) == 3
    assert t.categories == ["mmlu_law", "mmlu_math", "mmlu_math"]  # files in sorted order
    np.testing.assert_array_equal(t.quality, [[1, 0], [0, 1], [1, 1]])
    # "1+1?" is 4 chars -> 1 token in; 10 tokens out
    assert t.cost[1, 1] == pytest.approx((1 * 10 + 10 * 20) / 1e6)
    rows = [["q", "True", "True"], ["r", "maybe", "True"], ["s", "False", "True"]]
    write_csv(tmp_path / "bad.csv", ["prompt", "a", "b"], rows)
    with pytest.raises(ValueError, match=r"bad.csv row 3 column 'a': expected True/False or a number, found 'maybe'"):
        load_routellm(tmp_path / "bad.csv", prices=PRICES)
    write_csv(tmp_path / "other.csv", ["prompt", "a", "c"], [["q", "True", "True"]])
    with pytest.raises(ValueError, match="expected model columns"):
        load_routellm([tmp_path / "mmlu_math.csv", tmp_path / "other.csv"], prices=PRICES)


ROUTERBENCH_HEADER = ["sample_id", "prompt", "eval_name", "a", "b", "a|total_cost", "b|total_cost", "a|model_response"]
ROUTERBENCH_ROWS = [
    ["s1", "hello", "mmlu", "1.0", "0.0", "0.001", "0.01", "hi"],
    ["s2", "what", "gsm8k", "0.0", "1.0", "0.002", "0.02", "x"],
]


def test_load_routerbench_csv(tmp_path):
    write_csv(tmp_path / "rb.csv", ROUTERBENCH_HEADER, ROUTERBENCH_ROWS)
    t = load_routerbench(tmp_path / "rb.csv")
    assert t.models == ["a", "b"] and t.categories == ["mmlu", "gsm8k"]
    np.testing.assert_allclose(t.cost, [[0.001, 0.01], [0.002, 0.02]])
    np.testing.assert_allclose(t.quality, [[1, 0], [0, 1]])


@pytest.mark.skipif(not available("pyarrow"), reason="pyarrow not installed")
def test_load_routerbench_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {h: [r[i] for r in ROUTERBENCH_ROWS] for i, h in enumerate(ROUTERBENCH_HEADER)}
    for c in ("a", "b", "a|total_cost", "b|total_cost"):
        cols[c] = [float(v) for v in cols[c]]
    pq.write_table(pa.table(cols), tmp_path / "rb.parquet")
    t = load_table(tmp_path / "rb.parquet", format="routerbench")
    np.testing.assert_allclose(t.cost, [[0.001, 0.01], [0.002, 0.02]])


def test_routerbench_pickle_needs_explicit_permission(tmp_path):
    (tmp_path / "rb.pkl").write_bytes(b"not even read")
    with pytest.raises(PermissionError, match="--allow-pickle"):
        load_routerbench(tmp_path / "rb.pkl")


def test_load_sprout_wide_and_long(tmp_path):
    rec = lambda s, i, o: {"score": s, "num_input_tokens": i, "num_output_tokens": o, "response": "r"}  # noqa: E731
    rows = [
        {"prompt": "p1", "dataset": "math", "a": rec(0.0, 100, 10), "b": rec(1.0, 100, 20)},
        {"prompt": "p2", "dataset": "chat", "a": rec(0.5, 50, 10), "b": rec(1.0, 50, 10)},
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    t = load_sprout(tmp_path / "s.jsonl", prices=PRICES)
    assert t.models == ["a", "b"] and t.categories == ["math", "chat"]
    np.testing.assert_allclose(t.quality, [[0, 1], [0.5, 1]])
    assert t.cost[0, 1] == pytest.approx((100 * 10 + 20 * 20) / 1e6)
    long = [{"prompt": r["prompt"], "dataset": r["dataset"], "model": m, **r[m]} for r in rows for m in ("a", "b")]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in long))
    t2 = load_table(tmp_path / "long.jsonl", format="sprout", prices=PRICES)
    np.testing.assert_allclose(t2.cost, t.cost)
    bad = [{"prompt": "p", "a": {"score": 1.0, "num_input_tokens": 3}}]
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad[0]))
    with pytest.raises(ValueError, match="missing \\['num_output_tokens'\\]"):
        load_sprout(tmp_path / "bad.jsonl", prices=PRICES)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="known: \\['routellm'"):
        load_table(tmp_path, format="nope")
    with pytest.raises(FileNotFoundError):
        load_routerbench(tmp_path / "missing.csv")


def test_optional_dependency_message_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(MissingDependency, match="pip install pyarrow"):
        require("pyarrow")
    assert not available("pyarrow")
    with pytest.raises(KeyError, match="unknown optional dependency"):
        require("left-pad")


def test_mmlu_table_loads(mmlu_path):
    t = load_routellm(mmlu_path)
    assert len(t) == 14042 and len(set(t.categories)) == 57
    np.testing.assert_allclose(t.mean_quality(), [0.681, 0.806], atol=1e-3)
    assert t.mean_cost()[1] > 10 * t.mean_cost()[0]


def test_validation_share_does_not_change_the_test_part():
    t = small_table()
    a = split_rows(t, SplitConfig(by="query", test_size=0.3, val_size=0.0, seed=1))
    b = split_rows(t, SplitConfig(by="query", test_size=0.3, val_size=0.2, seed=1))
    assert a.test.tolist() == b.test.tolist()


def test_routellm_response_files_take_models_by_type_and_answer_lengths_for_cost(tmp_path):
    # RouteLLM's GSM8K file: correctness columns, then each model's answer as <model>_response
    long_answer = "Janet starts with 16 eggs. " * 40  # 1080 characters -> 270 tokens
    write_csv(
        tmp_path / "gsm8k.csv",
        ["prompt", "a", "b", "a_response", "b_response"],
        [["q one?", "True", "False", long_answer, "8"], ["q two!", "False", "True", "", "x" * 10]],
    )
    t = load_routellm(tmp_path / "gsm8k.csv", prices=PRICES, output_tokens=16)
    assert t.models == ["a", "b"] and t.categories == ["gsm8k", "gsm8k"]
    np.testing.assert_array_equal(t.quality, [[1, 0], [0, 1]])
    # prompt 6 chars -> 2 tokens; answers: 270 and 1 tokens (row 1), empty -> 16 and 3 tokens (row 2)
    np.testing.assert_allclose(
        t.cost, np.array([[2 * 1 + 270 * 2, 2 * 10 + 1 * 20], [2 * 1 + 16 * 2, 2 * 10 + 3 * 20]]) / 1e6
    )
    # a token-count column wins over the text
    write_csv(
        tmp_path / "counted.csv",
        ["prompt", "a", "b", "a_response", "a_output_tokens", "id", "label"],
        [["q", "1", "0.5", "long text " * 50, "7", "1041", "yes"]],
    )
    t = load_routellm(tmp_path / "counted.csv", prices=PRICES, output_tokens=16)
    assert t.models == ["a", "b"]  # "id" (1041) and "label" (text) are no models
    np.testing.assert_allclose(t.cost[0], [(1 * 1 + 7 * 2) / 1e6, (1 * 10 + 16 * 20) / 1e6])


def test_routellm_models_option_selects_before_checking_and_errors_stay_short(tmp_path):
    answer = "The answer is " + "very " * 2000 + "long."
    write_csv(
        tmp_path / "m.csv",
        ["prompt", "a", "b", "c"],
        [["q1", "True", "False", answer], ["q2", "False", "True", "True"]],
    )
    # "c" is a text column (not a model) unless chosen; chosen, its bad cell is named, cut short
    assert load_routellm(tmp_path / "m.csv", prices=PRICES).models == ["a", "b"]
    assert load_routellm(tmp_path / "m.csv", prices=PRICES, models=["b", "a"]).models == ["b", "a"]
    with pytest.raises(ValueError, match="row 2 column 'c'") as e:
        load_routellm(tmp_path / "m.csv", prices=PriceTable.from_dict({"c": {"input": 1, "output": 1}}), models=["c"])
    assert len(str(e.value)) < 300 and "characters)" in str(e.value)
    with pytest.raises(ValueError, match=r"no column for models \['zz'\]; correctness columns here: \['a', 'b'\]"):
        load_routellm(tmp_path / "m.csv", prices=PRICES, models=["zz"])
    write_csv(tmp_path / "text.csv", ["prompt", "answer"], [["q", "some words"]])
    with pytest.raises(ValueError, match="found none among"):
        load_routellm(tmp_path / "text.csv", prices=PRICES)
