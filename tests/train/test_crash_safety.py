"""Crash-safe runs: a process killed at any point of a checkpoint write, by SIGTERM/Ctrl-C or mid-step leaves a
run folder that evaluates and resumes to exactly the weights of an uninterrupted run, with each step logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit.train.checkpoint as ckpt_mod
import moekit.train.trainer as trainer_mod
import moekit.utils.io as io_mod
from moekit.train import read_meta
from moekit.train.checkpoint import has_checkpoint
from moekit.train.trainer import truncate_log
from moekit.utils.io import folder_lock
from tests.train.test_trainer import run, weights

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in moekit catches it, so no clean-up code runs after it."""


def logged_steps(run_dir: Path, name: str = "train.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / name).read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def full20(tmp_path_factory) -> Path:
    """The uninterrupted reference: 20 steps, checkpoints every 5."""
    d = tmp_path_factory.mktemp("full") / "run"
    run(d, 20)
    return d


def _kill_during_write(monkeypatch, at_step: int, target: str, nth: int, when: str) -> None:
    """Raise Killed at the `nth` call of `target` while the checkpoint of `at_step` is written, `when` = "before"
    or "after" the real call runs ("half": delete one file of the folder, then die: a kill mid-rmtree)."""
    armed = {"on": False, "calls": 0}
    owners = {"save_file": ckpt_mod, "torch.save": torch, "os.replace": io_mod.os, "shutil.rmtree": io_mod.shutil}
    owner, attr = owners[target], target.rsplit(".", 1)[-1]
    real = getattr(owner, attr)

    def injected(*args, **kwargs):
        if not armed["on"]:
            return real(*args, **kwargs)
        armed["calls"] += 1
        if armed["calls"] != nth:
            return real(*args, **kwargs)
        if when == "before":
            raise Killed(target)
        if when == "half":
            os.remove(next(p for p in Path(args[0]).iterdir() if p.is_file()))
            raise Killed(target)
        real(*args, **kwargs)
        raise Killed(target)

    monkeypatch.setattr(owner, attr, injected)
    real_save = trainer_mod.save_checkpoint

    def save(run_dir, model, meta, state=None):
        armed["on"] = meta["step"] == at_step
        try:
            return real_save(run_dir, model, meta, state)
        finally:
            armed["on"] = False

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)


# Each step of save_checkpoint's write of the step-10 checkpoint (the step-5 one is on disk), and the step whose
# checkpoint survives the kill. Calls of save_checkpoint: save_file (tensors), config.json, torch.save (optimiser
# and RNG state), os.replace #1 (checkpoint -> checkpoint.old), os.replace #2 (temp -> checkpoint), rmtree(old).
KILL_POINTS = {
    "before tensors": ("save_file", 1, "before", 5),
    "after tensors": ("save_file", 1, "after", 5),
    "after trainer state": ("torch.save", 1, "after", 5),
    "before the first rename": ("os.replace", 1, "before", 5),
    "between the renames": ("os.replace", 1, "after", 5),
    "after the second rename": ("os.replace", 2, "after", 10),
    "while deleting checkpoint.old": ("shutil.rmtree", 1, "half", 10),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_at_each_point_of_a_checkpoint_write_resumes_exactly(tmp_path, monkeypatch, full20, point):
    target, nth, when, survivor = KILL_POINTS[point]
    d = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_during_write(m, 10, target, nth, when)
        with pytest.raises(Killed):
            run(d, 20)
    assert has_checkpoint(d)
    if point == "between the renames":  # the state the brief reproduced: only checkpoint.old is left
        assert not (d / "checkpoint").exists() and (d / "checkpoint.old").is_dir()
    (d / "notes.txt").write_text("mine")  # recovery touches nothing but its own leftovers
    assert logged_steps(d) == list(range(1, 11))  # the log got past the surviving checkpoint in some cases

    run(d, 20, resume=True)
    assert_same_weights(d, full20)
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "eval.jsonl", "notes.txt", "train.jsonl"]
    assert logged_steps(d) == list(range(1, 21))  # truncated back to `survivor` on resume: no step twice
    assert logged_steps(d, "eval.jsonl") == [5, 10, 15, 20]
    assert survivor in (5, 10)


def test_killed_during_the_first_write_leaves_nothing_to_resume_and_a_fresh_run_starts(tmp_path, monkeypatch, full20):
    d = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_during_write(m, 5, "os.replace", 1, "before")
        with pytest.raises(Killed):
            run(d, 20)
    assert not has_checkpoint(d) and len(list(d.glob(".checkpoint-*"))) == 1
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(d, 20, resume=True)
    run(d, 20)
    assert_same_weights(d, full20)
    assert not list(d.glob(".checkpoint-*"))


def test_eval_recovers_checkpoint_old_and_removes_stale_temp_folders_but_not_a_live_writers(tmp_path):
    d = tmp_path / "run"
    run(d, 5)
    os.replace(d / "checkpoint", d / "checkpoint.old")  # killed between the renames of the next write
    (d / ".checkpoint-abc123").mkdir()  # a killed write's temp folder
    (d / ".checkpoint-abc123" / "model.safetensors").write_bytes(b"half")
    (d / "notes.txt").write_text("mine")
    with folder_lock(d) as held:  # a live writer holds the folder: its temp folder is not stale
        assert held
        assert read_meta(d)["step"] == 5  # read from checkpoint.old, nothing changed
        assert (d / ".checkpoint-abc123").is_dir() and (d / "checkpoint.old").is_dir()
    assert read_meta(d)["step"] == 5  # no writer: the next reader (eval, generate) puts things in order
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "eval.jsonl", "notes.txt", "train.jsonl"]


def test_fresh_run_never_deletes_a_checkpoint_unless_asked(tmp_path):
    d = tmp_path / "run"
    run(d, 5)
    before = (d / "checkpoint" / "model.safetensors").read_bytes()
    os.replace(d / "checkpoint", d / "checkpoint.old")
    with pytest.raises(FileExistsError, match="(?s)--resume.*--overwrite"):
        run(d, 3)
    assert (d / "checkpoint" / "model.safetensors").read_bytes() == before  # recovered, not deleted
    with pytest.raises(ValueError, match="exclude each other"):
        run(d, 3, resume=True, overwrite=True)
    (d / "notes.txt").write_text("mine")
    run(d, 3, overwrite=True)
    run(tmp_path / "fresh", 3)
    assert_same_weights(d, tmp_path / "fresh")
    assert read_meta(d)["step"] == 3 and logged_steps(d) == [1, 2, 3]
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint", "eval.jsonl", "notes.txt", "train.jsonl"]


def test_a_second_trainer_is_refused_while_a_run_holds_the_folder(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setattr(trainer_mod, "LOCK_WAIT_S", 0.0)
    with folder_lock(d):
        with pytest.raises(FileExistsError, match="in use"):
            run(d, 3)
    assert list(d.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, sig):
    def send(step):
        if step == 7:
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    res = run(tmp_path / "split", 12, on_step=send)
    assert res.interrupted and res.step == 7 and read_meta(tmp_path / "split")["step"] == 7
    assert signal.getsignal(sig) is before  # the handlers are put back
    run(tmp_path / "split", 12, resume=True)
    run(tmp_path / "full", 12)
    assert_same_weights(tmp_path / "split", tmp_path / "full")
    assert logged_steps(tmp_path / "split") == list(range(1, 13))


def test_a_second_signal_aborts_without_a_checkpoint(tmp_path):
    def send_twice(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", 12, on_step=send_twice)
    assert read_meta(tmp_path / "split")["step"] == 5  # the periodic checkpoint, untouched
    run(tmp_path / "split", 12, resume=True)
    run(tmp_path / "full", 12)
    assert_same_weights(tmp_path / "split", tmp_path / "full")
    assert logged_steps(tmp_path / "split") == list(range(1, 13))


CHILD = """
import sys, time
from tests.train.test_trainer import run
def tick(step):
    print(step, flush=True)
    time.sleep(0.05)
res = run(sys.argv[1], 1000, on_step=tick)
print("result", res.step, res.interrupted, flush=True)
"""


@pytest.mark.slow  # process start-up (torch import, first optimiser) takes ~8 s on a busy 2-core machine
def test_sigterm_from_another_process(tmp_path):
    """A real SIGTERM to a training subprocess: it finishes its step, writes a checkpoint and returns; a resume
    then continues exactly (a long schedule cut short with stop_after, compared with the same cut in one go)."""
    d = tmp_path / "split"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(d)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "3":
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    _, step, interrupted = out.split()[-3:]
    step = int(step)
    assert interrupted == "True" and 3 <= step < 1000 and read_meta(d)["step"] == step
    run(d, 1000, resume=True, stop_after=step + 2)
    run(tmp_path / "full", 1000, stop_after=step + 2)
    assert_same_weights(d, tmp_path / "full")


def test_truncate_log_keeps_the_prefix_up_to_the_step(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # a line cut by a kill
    truncate_log(p, 2)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    p.write_text('{"step": 1}\n{"step": 2}')  # a whole last row without its newline is kept
    truncate_log(p, 5)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    truncate_log(tmp_path / "missing.jsonl", 3)
    assert not (tmp_path / "missing.jsonl").exists()


def test_files_are_in_the_run_folder_before_the_first_step(tmp_path):
    src = tmp_path / "tok.json"
    src.write_text('{"vocab": 1}')
    d = tmp_path / "run"
    seen = []
    run(d, 1, files={"tokenizer.json": src}, on_step=lambda step: seen.append((d / "tokenizer.json").read_text()))
    assert seen == ['{"vocab": 1}'] and not list(d.glob(".tokenizer.json.*"))
