"""The leaderboard over several seeds: the mean/spread aggregation, the 'seen' rule of the paper claims, the run
layout (reuse of finished and single-seed runs), and the --seeds option."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from moekit.bench import run_leaderboard
from moekit.bench.claims import CLAIM_ENTRIES, CLAIMS, Claim, compare, is_seen
from moekit.bench.seeds import aggregate, parse_seeds
from moekit.cli.main import app
from moekit.train.checkpoint import read_meta

OLD_HEADER = ("| router | val loss | bible | code | wiki | tok/s | active experts | load max/mean | load CV | "
              "dropped | MI(expert;domain) bits | MFLOPs/token | params (M) |")


def fake_row(router: str, loss: float, per: dict[str, float], flops: float = 2e6, **extra) -> dict:
    return {"router": router, "registered": router, "router_args": {"k": 2}, "note": "", "dtype": "float32",
            "val_loss": loss, "val_loss_per_domain": per, "trained_on": "cpu", "depth_processed": None,
            "tokens_per_s": 100.0, "active_experts": 2.0, "load_max_over_mean": 1.2, "load_cv": 0.1,
            "dropped_frac": 0.0, "expert_domain_mi_bits": 0.3, "active_flops_per_token": flops,
            "params_total": 1000, "train_seconds": 1.0, "history": [{"step": 3, "loss": loss}], **extra}


def test_aggregate_mean_sample_std_min_max_by_hand():
    rows = [fake_row("topk", 5.0, {"a": 4.0, "b": 6.0}, tokens_per_s=90.0),
            fake_row("topk", 5.2, {"a": 4.0, "b": 6.4}, tokens_per_s=100.0),
            fake_row("topk", 5.6, {"a": 4.3, "b": 6.9}, tokens_per_s=140.0)]
    r = aggregate(rows, [0, 1, 2])
    assert r["val_loss"] == pytest.approx(15.8 / 3)
    # sample std: deviations -0.2667, -0.0667, +0.3333 -> sum of squares 0.18667 / (3 - 1)
    assert r["val_loss_std"] == pytest.approx(math.sqrt(0.186666666 / 2), rel=1e-6)
    assert (r["val_loss_min"], r["val_loss_max"]) == (5.0, 5.6)
    assert r["val_loss_per_domain"] == pytest.approx({"a": 4.1, "b": 6.4333333})
    assert r["val_loss_per_domain_std"]["a"] == pytest.approx(math.sqrt(0.06 / 2))  # 0.1^2 + 0.1^2 + 0.2^2
    assert r["val_loss_per_domain_min"] == {"a": 4.0, "b": 6.0} and r["val_loss_per_domain_max"] == {"a": 4.3, "b": 6.9}
    assert r["tokens_per_s"] == pytest.approx(110.0) and r["n_seeds"] == 3 and r["seeds"] == [0, 1, 2]
    assert [p["val_loss"] for p in r["per_seed"]] == [5.0, 5.2, 5.6] and r["train_seconds"] == 3.0
    with pytest.raises(ValueError, match="one row per seed"):
        aggregate(rows[:2], [0, 1, 2])


def test_seen_rule_edges():
    assert not is_seen(0.2, 0.1)  # exactly 2x: not seen
    assert is_seen(0.2001, 0.1) and is_seen(-0.2001, 0.1)
    assert not is_seen(0.0, 0.0) and is_seen(1e-9, 0.0)


def agg(router: str, losses: list[float], flops: float = 2e6) -> dict:
    return aggregate([fake_row(router, x, {"a": x}, flops) for x in losses], list(range(len(losses))))


def test_compare_uses_the_larger_spread_and_reads_the_claim():
    hash_ = Claim("h", "p", "hash as good", "hash", "topk", "not_higher")
    ec = Claim("e", "p", "ec lower", "expert_choice", "topk", "lower")
    null = Claim("n", "p", "null cheaper", "null_experts", "topk", "not_higher", cheaper=True)
    topk = agg("topk", [5.0, 5.02])  # std 0.01414
    rows = [topk, agg("hash", [5.1, 5.3]),  # gap 0.19, larger std 0.1414 -> 2x = 0.283: not seen
            agg("expert_choice", [4.9, 4.92]),  # gap -0.1 > 2 x 0.01414: seen, agrees
            agg("null_experts", [4.5, 4.52], flops=3e6)]  # lower loss but more FLOPs
    res = {r["claim"]: r for r in compare(rows, (hash_, ec, null))}
    assert res["h"]["spread"] == pytest.approx(math.sqrt(0.02)) and res["h"]["verdict"] == "not seen"
    assert res["h"]["reading"].startswith("consistent")
    assert res["e"]["gap"] == pytest.approx(-0.1) and res["e"]["verdict"] == "seen" and res["e"]["reading"] == "agrees"
    assert res["n"]["verdict"] == "seen" and res["n"]["reading"] == "contradicted (not fewer FLOPs)"
    worse = compare([topk, agg("expert_choice", [5.5, 5.52])], (ec,))[0]
    assert worse["verdict"] == "seen" and worse["reading"] == "contradicted (higher loss)"
    one_seed = compare([fake_row("topk", 5.0, {"a": 5.0}), fake_row("hash", 9.0, {"a": 9.0})], (hash_,))[0]
    assert one_seed["verdict"] == "n/a (1 seed)" and one_seed["gap"] == pytest.approx(4.0)
    assert compare([topk], (hash_,))[0]["verdict"] == "n/a (not run)"


def test_claims_name_leaderboard_entries():
    assert {"hash", "topk", "mixture_of_depths", "null_experts", "stochastic", "switch"} <= set(CLAIM_ENTRIES)
    assert len({c.key for c in CLAIMS}) == len(CLAIMS) == 7
    with pytest.raises(ValueError, match="expected a leaderboard entry"):
        Claim("x", "p", "t", "nope", "topk", "lower")


def test_parse_seeds():
    assert parse_seeds("0,1, 2") == [0, 1, 2] and parse_seeds("3") == [3]
    for bad in ("", "0,,1", "a", "-1,2", "1.5", "0,0"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_cli_rejects_bad_seeds_in_one_line(tmp_path):
    out = CliRunner().invoke(app, ["bench", "routers", "--seeds", "0,x", "--out", str(tmp_path / "o")])
    assert out.exit_code == 1 and out.output.startswith("error:") and out.output.count("\n") == 1, out.output
    assert "'0,x'" in out.output and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(root / "cache"))
    quiet = dict(progress=False, log=lambda *_: None)
    single = run_leaderboard("smoke", ["topk", "hash"], root / "out", **quiet)  # today's single-seed run
    single.md = single.files[0].read_text()  # before the multi-seed run rewrites it
    logs: list[str] = []
    multi = run_leaderboard("smoke", ["topk", "hash"], root / "out", seeds=[0, 1], progress=False, log=logs.append)
    yield root, single, multi, logs
    mp.undo()


def test_single_seed_output_keeps_its_layout(board):
    root, single, _, _ = board
    assert (root / "out" / "runs" / "topk" / "checkpoint").is_dir()
    md = single.md
    assert OLD_HEADER in md and "seed 0," in md and "Paper claims" not in md
    assert set(single.rows[0]) == {"router", "registered", "router_args", "note", "val_loss", "val_loss_per_domain",
                                   "tokens_per_s", "trained_on", "dtype", "train_seconds", "active_experts",
                                   "load_max_over_mean", "load_cv", "dropped_frac", "expert_domain_mi_bits",
                                   "depth_processed", "active_flops_per_token", "params_total", "history"}


def test_seeds_reuse_the_single_seed_runs_and_share_the_first_seeds_data(board):
    root, single, multi, logs = board
    assert logs == ["[2/4] topk seed 1: training 3 steps", "[4/4] hash seed 1: training 3 steps"]  # seed 0 reused
    seed1 = root / "out" / "runs" / "topk" / "seed1"
    meta = read_meta(seed1)
    assert meta["data"]["seed"] == 0 and meta["train"]["seed"] == 1
    first = {r["router"]: r["val_loss"] for r in single.rows}
    for r in multi.rows:
        losses = [p["val_loss"] for p in r["per_seed"]]
        assert losses[0] == first[r["router"]] and r["val_loss"] == pytest.approx(sum(losses) / 2)
        assert r["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    data = json.loads((root / "out" / "leaderboard.json").read_text())
    assert data["seeds"] == [0, 1]
    hash_claim = next(c for c in data["claims"] if c["claim"] == "hash")
    assert hash_claim["verdict"] in ("seen", "not seen") and hash_claim["n_seeds"] == 2
    md = (root / "out" / "leaderboard.md").read_text()
    assert "| val loss (mean) | std | min | max |" in md and "## Paper claims" in md and "n/a (not run)" in md


def test_finished_seed_runs_are_reused_and_a_new_seed_trains_alone(board):
    root, _, multi, _ = board
    logs: list[str] = []
    again = run_leaderboard("smoke", ["topk"], root / "out", seeds=[0, 1, 2], progress=False, log=logs.append)
    assert logs == ["[3/3] topk seed 2: training 3 steps"]
    assert [p["val_loss"] for p in again.rows[0]["per_seed"][:2]] == [p["val_loss"] for p in multi.rows[0]["per_seed"]]
    # another first seed means other data for runs/<entry>/: refused, not silently mixed
    with pytest.raises(FileExistsError, match="data seed"):
        run_leaderboard("smoke", ["topk"], root / "out", seeds=[1, 0], progress=False, log=lambda *_: None)


def test_bench_train_refuses_a_missing_device_and_bf16_on_cpu_in_one_line(tmp_path):
    """benchmarks/bench_train.py takes moekit train's --device/--dtype: what this machine cannot run is one line."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"
    cases = [["--dtype", "bfloat16", "--device", "cpu"]]
    if not torch.cuda.is_available():
        cases.append(["--device", "cuda"])
    for extra in cases:
        p = subprocess.run([sys.executable, str(script), *extra, "--out", str(tmp_path / "b.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1, p.stderr
        assert not (tmp_path / "b.json").exists()


def test_docs_list_the_claims_in_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "leaderboard.md").read_text()
    for c in CLAIMS:
        assert f"| {c.entry} | {c.baseline} |" in doc and c.paper.split(" ")[0] in doc, c.key
