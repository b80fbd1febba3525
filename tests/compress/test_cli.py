"""`moekit compress`: writes a run folder `moekit eval` reads, or nothing at all."""

from __future__ import annotations

from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.models import MoELM
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.helpers import tiny_lm


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_compress_writes_a_run_eval_reads(trained_run, tmp_path):
    dst = tmp_path / "pruned"
    r = invoke("compress", "reap", trained_run, "--out", dst, "--ratio", "0.25", "--calib-batches", "2")
    assert r.exit_code == 0, r.output
    assert "params MoE" in r.output and "loss all" in r.output
    model = load_model(dst)
    assert model.config.num_experts == 3  # micro-moe: 4 experts, one removed
    assert (dst / "tokenizer.json").is_file()
    e = invoke("eval", dst)
    assert e.exit_code == 0 and "validation loss" in e.output, e.output
    again = invoke("compress", "frequency", trained_run, "--out", dst, "--no-eval", "--calib-batches", "1")
    assert again.exit_code == 1 and "--force" in again.output
    forced = invoke("compress", "frequency", trained_run, "--out", dst, "--no-eval", "--calib-batches", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "run"]


def test_compress_errors_write_nothing(trained_run, tmp_path):
    dst = tmp_path / "out" / "pruned"
    cases = [
        (["compress", "reap", trained_run, "--out", dst, "--ratio", "1.5"], "ratio"),
        (["compress", "nope", trained_run, "--out", dst], "unknown compression method 'nope'"),
        (["compress", "reap", trained_run, "--out", dst, "--ratio", "0.75"], "k=2"),
    ]
    for args, msg in cases:
        r = invoke(*args)
        assert r.exit_code == 1 and msg in r.output, r.output
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
        assert not dst.exists()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    dense = tmp_path / "dense"
    save_checkpoint(dense, MoELM(tiny_lm()), {"step": 0})
    r = invoke("compress", "reap", dense, "--out", dst)
    assert r.exit_code == 1 and "dense" in r.output and not dst.exists()


def test_compress_list():
    r = invoke("compress", "--list")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.output.splitlines()] == ["frequency", "mcsmoe", "naee", "reap", "svd",
                                                                        "distill", "qat"]


def test_compress_merge_and_decompose_write_runs_eval_reads(trained_run, tmp_path):
    merged = tmp_path / "merged"
    r = invoke("compress", "mcsmoe", trained_run, "--out", merged, "--ratio", "0.25", "--calib-batches", "2")
    assert r.exit_code == 0, r.output
    assert "mcsmoe: merged 0.25" in r.output and "loss all" in r.output
    assert load_model(merged).config.num_experts == 3
    svd = tmp_path / "svd"
    r = invoke("compress", "svd", trained_run, "--out", svd, "--rank", "2", "--no-eval")
    assert r.exit_code == 0, r.output
    model = load_model(svd)
    assert model.config.experts == "lowrank" and set(model.config.experts_args["rank"].values()) == {2}
    e = invoke("eval", svd)
    assert e.exit_code == 0 and "validation loss" in e.output, e.output


def test_compress_merge_and_decompose_errors_write_nothing(trained_run, tmp_path):
    dst = tmp_path / "out" / "x"
    cases = [
        (["compress", "svd", trained_run, "--out", dst, "--rank", "-1"], "rank"),
        (["compress", "svd", trained_run, "--out", dst, "--rank", "100000"], "rank must be an integer in"),
        (["compress", "svd", trained_run, "--out", dst, "--ratio", "1.0"], "ratio"),
        (["compress", "svd", trained_run, "--out", dst, "--ratio", "0.5", "--rank", "1"], "not both"),
        (["compress", "mcsmoe", trained_run, "--out", dst, "--ratio", "0"], "ratio"),
        (["compress", "mcsmoe", trained_run, "--out", dst, "--rank", "100000"], "rank"),
        (["compress", "mcsmoe", trained_run, "--out", dst, "--rank", "1", "--sparsity", "2"], "sparsity"),
    ]
    for args, msg in cases:
        r = invoke(*args)
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
        assert not dst.exists()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
