"""`moekit.train.tune`: axes parse, points apply, coordinate and grid visit what they say, runs are reused."""

from __future__ import annotations

import json

import pytest

from moekit.train import TrainConfig
from moekit.train.reuse import run_state
from moekit.train.tune import applies, configure, parse_axis, point_name, tune
from tests.helpers import tiny_lm
from tests.train.test_trainer import Synthetic

DENSE = tiny_lm(vocab_size=32, max_seq_len=16, ffn_hidden=32)
MOE = tiny_lm(vocab_size=32, max_seq_len=16, ffn_hidden=32, num_experts=4, expert_hidden=16, router_args={"k": 2})
TRAIN = TrainConfig.short_run(4, batch_size=2, seq_len=16, eval_every=4, log_every=1)


def sweep(tmp, models, axes, mode="coordinate"):
    data = Synthetic()
    return tune(models, TRAIN, data, data.windows(16, n=2), axes, tmp, mode=mode, progress=False, log=lambda _: None)


def test_parse_axis():
    assert parse_axis("lr=1e-3, 3e-3") == ("lr", [0.001, 0.003])
    assert parse_axis("router_args.load_balance=0,0.001") == ("router_args.load_balance", [0, 0.001])
    for bad in ("lr", "lr=", "=1", "lr=1,1"):
        with pytest.raises(ValueError):
            parse_axis(bad)


def test_point_applies_to_the_right_config():
    model, train = configure(MOE, TRAIN, {"lr": 0.01, "ffn_out_mult": 2.0, "router_args.load_balance": 0.0})
    assert (train.lr, model.ffn_out_mult, model.router_args) == (0.01, 2.0, {"k": 2, "load_balance": 0.0})
    assert not applies(DENSE, "router_args.load_balance") and applies(MOE, "router_args.load_balance")
    assert applies(DENSE, "ffn_out_mult") and applies(DENSE, "lr")
    assert point_name({"router": "hash", "lr": 0.003}) == "lr=0.003,router=hash"  # one name whatever the order
    assert point_name({}) == "base"


def test_coordinate_and_grid(tmp_path):
    axes = [("lr", [1e-3, 1e-2]), ("router_args.load_balance", [0.01, 0.0])]
    res = sweep(tmp_path / "c", {"dense": DENSE, "moe": MOE}, axes)
    # the dense model skips the router axis: 2 points; the MoE: 2 lrs, then 2 coefficients at the best lr (one
    # of them the point already run) -> 3
    assert [r["model"] for r in res.rows].count("dense") == 2
    moe = [r["settings"] for r in res.rows if r["model"] == "moe"]
    assert len(moe) == 3 and moe[0] == {"lr": 1e-3, "router_args.load_balance": 0.01}
    best_lr = min(res.rows[2:4], key=lambda r: r["val_loss"])["settings"]["lr"]
    assert moe[2] == {"lr": best_lr, "router_args.load_balance": 0.0}
    for name, best in res.best.items():
        assert best["val_loss"] == min(r["val_loss"] for r in res.rows if r["model"] == name)
    written = json.loads((tmp_path / "c" / "sweep.json").read_text())
    assert written["best"]["moe"]["settings"] == res.best["moe"]["settings"]
    assert "**best**" in (tmp_path / "c" / "sweep.md").read_text()
    grid = sweep(tmp_path / "g", {"moe": MOE}, axes, mode="grid")
    assert len(grid.rows) == 4


def test_finished_points_are_reused_and_foreign_runs_refused(tmp_path):
    axes = [("lr", [1e-3])]
    first = sweep(tmp_path, {"dense": DENSE}, axes)
    run_dir = tmp_path / "runs" / "dense" / "lr=0.001"
    mtime = (run_dir / "eval.jsonl").stat().st_mtime_ns
    again = sweep(tmp_path, {"dense": DENSE}, axes)
    assert again.rows[0]["val_loss"] == first.rows[0]["val_loss"]
    assert (run_dir / "eval.jsonl").stat().st_mtime_ns == mtime  # not retrained
    assert run_state(run_dir, configure(DENSE, TRAIN, {"lr": 1e-3})[0], configure(DENSE, TRAIN, {"lr": 1e-3})[1]) == (
        "done"
    )
    with pytest.raises(FileExistsError, match="another model"):
        sweep(tmp_path, {"dense": MOE}, axes)  # same folder name, another model


def test_bad_axes_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="sweep axis lr"):
        sweep(tmp_path, {"dense": DENSE}, [("lr", ["fast"])])
    with pytest.raises(ValueError, match="mode"):
        sweep(tmp_path, {"dense": DENSE}, [("lr", [1e-3])], mode="random")
    with pytest.raises(ValueError, match="twice"):
        sweep(tmp_path, {"dense": DENSE}, [("lr", [1e-3]), ("lr", [1e-2])])
    assert not (tmp_path / "runs").exists()
