"""`moekit train` interrupted: exit code 130 with a checkpoint, a killed run can still generate, --overwrite."""

from __future__ import annotations

import json
import os
import signal

import pytest
from typer.testing import CliRunner

import moekit.train.run as run_mod
from moekit.cli.main import app

runner = CliRunner()
SMALL = ["--vocab-size", "320", "--set", "max_chars_per_domain=60000", "--set", "eval_windows=2", "--no-progress"]
TRAIN = ["train", "--preset", "micro-moe", "--steps", "6", "--seq-len", "16", *SMALL]
TRAIN += ["--set", "ckpt_every=2", "--set", "log_every=1"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


def with_on_step(monkeypatch, on_step):
    """Make `moekit train` call on_step(step) after each optimiser step."""
    real = run_mod.train
    monkeypatch.setattr(run_mod, "train", lambda *a, **kw: real(*a, on_step=on_step, **kw))


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_sigterm_writes_a_checkpoint_and_exits_130(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        with_on_step(m, lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
        r = invoke(*TRAIN, "--out", str(run))
    assert r.exit_code == 130, r.output
    assert "interrupted at step 3" in r.output
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 3
    r = invoke(*TRAIN, "--out", str(run), "--resume")
    assert r.exit_code == 0 and "finished at step 6" in r.output, r.output
    steps = [json.loads(line)["step"] for line in (run / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_killed_run_can_generate_and_overwrite_starts_over(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def kill(step):
        if step == 3:
            raise Killed

    with monkeypatch.context() as m:
        with_on_step(m, kill)
        with pytest.raises(Killed):
            invoke(*TRAIN, "--out", str(run))
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 2
    g = invoke("generate", str(run), "--prompt", "In the beginning", "--max-new-tokens", "3", "--temperature", "0")
    assert g.exit_code == 0 and g.output.startswith("In the beginning"), g.output
    r = invoke(*TRAIN, "--out", str(run))
    assert r.exit_code != 0 and "--resume" in r.output and "--overwrite" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = invoke(*TRAIN, "--out", str(run), "--overwrite")
    assert r.exit_code == 0 and "finished at step 6" in r.output, r.output
    steps = [json.loads(line)["step"] for line in (run / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
