"""`moekit compress distill` and `moekit compress qat`: a run folder `moekit eval` reads, or nothing at all."""

from __future__ import annotations

from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.train.checkpoint import load_model, read_meta


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_distill_and_qat_from_the_command_line(trained_run, tmp_path):
    listed = invoke("compress", "--list")
    assert "distill" in listed.output and "qat" in listed.output
    pruned = tmp_path / "pruned"
    assert invoke("compress", "frequency", trained_run, "--out", pruned, "--no-eval", "--calib-batches", "1"
                  ).exit_code == 0
    dst = tmp_path / "distilled"
    r = invoke("compress", "distill", trained_run, "--student", pruned, "--out", dst, "--steps", "1",
               "--batch-size", "2", "--samples", "2")
    assert r.exit_code == 0, r.output
    assert "validation loss after 1 steps" in r.output and load_model(dst).config.num_experts == 3
    assert read_meta(dst)["compress"][-1]["samples"] == 2
    q = tmp_path / "binary"
    r = invoke("compress", "qat", pruned, "--out", q, "--steps", "1", "--batch-size", "2", "--mode", "binary")
    assert r.exit_code == 0, r.output
    assert load_model(q).config.experts == "ffn" and read_meta(q)["compress"][-1]["mode"] == "binary"
    assert invoke("eval", q).exit_code == 0


def test_distill_and_qat_errors_write_nothing(trained_run, tmp_path):
    dst = tmp_path / "out"
    cases = [
        (["compress", "distill", trained_run, "--out", dst], "--student"),
        (["compress", "qat", trained_run, "--out", dst, "--mode", "int3"], "mode must be one of"),
        (["compress", "qat", trained_run, "--out", dst, "--steps", "0"], "FinetuneConfig.steps"),
        (["compress", "distill", trained_run, "--student", trained_run, "--out", dst, "--alpha", "0"],
         "DistillConfig.alpha"),
        (["compress", "reap", trained_run, "--student", trained_run, "--out", dst], "--student is for distill"),
    ]
    for args, msg in cases:
        r = invoke(*args)
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
