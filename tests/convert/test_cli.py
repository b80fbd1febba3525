"""`moekit convert` and `moekit train --init`: run folders that `moekit train` continues, or nothing at all."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.data import DataConfig, prepare_data
from moekit.train.checkpoint import load_model, read_meta
from tests.convert.conftest import SMALL


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_list_methods():
    r = invoke("convert", "--list")
    assert r.exit_code == 0 and "upcycle" in r.output and "split" in r.output


def test_upcycle_run_equals_dense_and_writes_a_run_folder(dense_run, tmp_path):
    dst = tmp_path / "moe"
    r = invoke("convert", "upcycle", dense_run, "--out", dst, "--experts", "4", "--k", "2")
    assert r.exit_code == 0, r.output
    assert "experts per MoE block 4 of width 64, top-2" in r.output and "copied:" in r.output
    assert "active" in r.output
    dense, moe = load_model(dense_run).eval(), load_model(dst).eval()
    ids = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    meta = read_meta(dst)
    assert meta["convert"][0]["method"] == "upcycle" and meta["data"] == read_meta(dense_run)["data"]
    assert (dst / "tokenizer.json").is_file()
    again = invoke("convert", "upcycle", dense_run, "--out", dst, "--experts", "2")
    assert again.exit_code == 1 and "--force" in again.output
    assert load_model(dst).config.num_experts == 4  # untouched
    forced = invoke("convert", "upcycle", dense_run, "--out", dst, "--experts", "2", "--k", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert load_model(dst).config.num_experts == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "run"]


def test_split_run_uses_the_runs_calibration_data(dense_run, tmp_path):
    dst = tmp_path / "split"
    r = invoke("convert", "split", dense_run, "--out", dst, "--experts", "4", "--k", "4", "--router-steps", "5",
               "--calib-batches", "2")
    assert r.exit_code == 0, r.output
    assert "router recall" in r.output and "activations clustering" in r.output
    moe, dense = load_model(dst).eval(), load_model(dense_run).eval()
    ids = torch.randint(0, 320, (2, 16))  # k = E: every expert active; weights ~1 after flattening
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=5e-2, rtol=0)


def test_errors_write_nothing(dense_run, tmp_path):
    dst = tmp_path / "out" / "moe"
    cases = [
        (["convert", "upcycle", dense_run, "--out", dst, "--granularity", "5"], "must divide the dense FFN width"),
        (["convert", "split", dense_run, "--out", dst, "--experts", "5"], "must divide the dense FFN width"),
        (["convert", "nope", dense_run, "--out", dst], "unknown conversion method 'nope'"),
        (["convert", "upcycle", tmp_path / "missing", "--out", dst], "does not exist"),
        (["convert", "upcycle", dense_run], "give METHOD SRC --out DST"),
    ]
    for args, msg in cases:
        r = invoke(*args)
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
        assert r.output.startswith("error:"), r.output
    moe = tmp_path / "moe"
    assert invoke("convert", "upcycle", dense_run, "--out", moe, "--experts", "2", "--k", "1").exit_code == 0
    r = invoke("convert", "upcycle", moe, "--out", dst)
    assert r.exit_code == 1 and "already has experts" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "run"]


def test_train_init_starts_from_the_checkpoint_weights(dense_run, tmp_path, monkeypatch):
    moe = tmp_path / "moe"
    assert invoke("convert", "upcycle", dense_run, "--out", moe, "--experts", "4", "--k", "2").exit_code == 0
    out = tmp_path / "cont"
    r = invoke("train", "--init", moe, "--out", out, "--steps", "2", "--seq-len", "16", "--batch-size", "4",
               "--set", "log_every=1", *SMALL)
    assert r.exit_code == 0, r.output
    meta = read_meta(out)
    assert meta["init"] == str(moe) and meta["model"] == read_meta(moe)["model"]
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    # the step-1 log row is the loss of the starting weights on the run's first batch: the source's loss there
    src = load_model(moe).train()
    data = prepare_data(DataConfig(**meta["data"]), progress=False)
    x, y, _ = data.train.sample_batch(4, 16, torch.Generator().manual_seed(meta["train"]["seed"] + 1))
    with torch.no_grad():
        expected = float(src(x, targets=y).loss)
    assert first["step"] == 1 and abs(first["loss"] - expected) < 1e-5
    dense = load_model(dense_run).train()
    with torch.no_grad():
        assert abs(float(dense(x, targets=y).loss) - expected) < 1e-5  # = the dense model's too (exact upcycle)
    assert load_model(out).config.num_experts == 4
    bad = invoke("train", "--init", tmp_path / "nowhere", "--out", tmp_path / "x", *SMALL)
    assert bad.exit_code == 1 and "does not exist" in bad.output
    assert not (tmp_path / "x").exists()


def test_init_weights_that_do_not_fit_the_model_config_are_refused(dense_run, tmp_path):
    import pytest

    from moekit.train.trainer import load_init
    from tests.convert.conftest import dense_lm

    other = dense_lm(vocab_size=320, ffn_hidden=32)  # another FFN width than the run's 64
    with pytest.raises(ValueError, match=r"--init .*: its weights do not fit the model config .*other shapes"):
        load_init(other, dense_run)
    same = load_model(dense_run)
    fresh = type(same)(same.config)
    load_init(fresh, dense_run)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), same.state_dict().values(), strict=True))
