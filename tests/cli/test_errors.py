"""Every failure of a verb is one line `error: ...` naming the file or field, exit code 1, no traceback
(the traceback only with --debug or MOEKIT_DEBUG=1); a failed command removes what it created."""

from __future__ import annotations

import errno
import json
import pathlib

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app
from tests.cli.conftest import SMALL

runner = CliRunner()
TRAIN = ["train", "--preset", "micro-moe", "--steps", "2", "--seq-len", "16", *SMALL]


def fails(*args: str, env: dict | None = None) -> str:
    """Run the command, check it failed the house way, return its one error line."""
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)  # handled, not raised
    return lines[0]


def test_corrupt_or_truncated_weights_name_the_file(trained_run):
    weights = trained_run / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:1000], b"garbage"):
        weights.write_bytes(broken)
        for verb in (["eval"], ["generate", "--max-new-tokens", "2"], ["inspect"]):
            line = fails(verb[0], trained_run, *verb[1:])
            assert "model.safetensors" in line and "corrupt or truncated" in line


@pytest.mark.parametrize(("text", "found"), [("garbage{", "invalid JSON"), ("[1, 2]", "a JSON list"),
                                             ('{"model": 5}', '"model" object')])
def test_bad_config_json_names_the_file(trained_run, text, found):
    (trained_run / "checkpoint" / "config.json").write_text(text)
    for verb in ("eval", "inspect", "generate", "export"):
        line = fails(verb, trained_run)
        assert "checkpoint/config.json" in line and found in line


def test_config_with_a_bad_model_field_names_the_file(trained_run):
    f = trained_run / "checkpoint" / "config.json"
    meta = json.loads(f.read_text())
    meta["model"]["dim"] = "wide"
    f.write_text(json.dumps(meta))
    for verb in ("inspect", "eval"):  # one reader (read_model_config) for the config alone and for load_model
        line = fails(verb, trained_run)
        assert "config.json: bad model config" in line and "dim" in line


def test_truncated_trainer_state_on_resume(trained_run):
    state = trained_run / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    line = fails(*TRAIN, "--out", trained_run, "--resume", "--steps", "4")
    assert "trainer_state.pt" in line and "corrupt or truncated" in line


def test_set_with_a_wrong_type_names_the_field(tmp_path):
    line = fails(*TRAIN, "--out", tmp_path / "run", "--set", 'lr="fast"')
    assert "lr" in line and "expects float" in line and "'fast'" in line
    line = fails(*TRAIN, "--out", tmp_path / "run", "--set", "steps=2.5")
    assert "train.steps expects int" in line
    assert not (tmp_path / "run").exists()


def test_jsonl_with_a_non_string_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": 5}\n')
    line = fails(*TRAIN, "--out", tmp_path / "run", "--data", tmp_path / "d.jsonl")
    assert "d.jsonl:1" in line and "text" in line and "int" in line
    assert not (tmp_path / "run").exists()


def _deny_mkdir_under(monkeypatch, root: pathlib.Path) -> None:
    """What a read-only folder does to mkdir (chmod cannot block root, so the error is injected)."""
    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_read_only_output_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_mkdir_under(monkeypatch, ro)
    line = fails(*TRAIN, "--out", ro / "run")
    assert "Permission denied" in line and str(ro / "run") in line


def test_read_only_cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEKIT_CACHE", str(cache))
    _deny_mkdir_under(monkeypatch, cache)
    line = fails(*TRAIN, "--out", tmp_path / "run")
    assert "Permission denied" in line and str(cache) in line and "MOEKIT_CACHE" in line
    assert not (tmp_path / "run").exists()


def test_disk_full_while_writing_a_checkpoint_names_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    import moekit.train.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    run = tmp_path / "run"
    line = fails(*TRAIN, "--out", run)
    assert "No space left on device" in line and str(run) in line
    assert not run.exists()  # no empty run folder, no .checkpoint-* temporary folder


def test_disk_full_on_resume_keeps_the_checkpoint_and_drops_the_temporary(trained_run, monkeypatch):
    import moekit.train.checkpoint as ckpt

    def full(state, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    before = (trained_run / "checkpoint" / "model.safetensors").read_bytes()
    line = fails(*TRAIN, "--out", trained_run, "--resume", "--steps", "3")
    assert "No space left on device" in line
    assert not [p for p in trained_run.iterdir() if p.name.startswith(".")]
    assert (trained_run / "checkpoint" / "model.safetensors").read_bytes() == before


def test_disk_full_in_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    from moekit.utils.io import atomic_write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "report.md", "x")
    assert info.value.filename == str(tmp_path / "report.md")
    assert list(tmp_path.iterdir()) == []


def test_failed_train_keeps_a_users_folder_and_removes_only_what_it_made(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    line = fails(*TRAIN, "--out", run, "--set", "router_args.k=9")  # the router refuses k > num_experts
    assert "k must be" in line
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    fails(*TRAIN, "--out", tmp_path / "a" / "b" / "run", "--set", "router_args.k=9")
    assert not (tmp_path / "a").exists()  # parents the command created go too


def test_ctrl_c_exits_130_and_cleans_up(tmp_path, monkeypatch):
    import moekit.train.run as run_mod

    def interrupted(*args, **kwargs):
        (tmp_path / "run").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_training", interrupted)
    r = runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "run")])
    assert r.exit_code == 130
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(trained_run):
    (trained_run / "checkpoint" / "config.json").write_text("garbage{")
    for args, env in ((["--debug", "inspect", str(trained_run)], None), (["inspect", str(trained_run)],
                                                                          {"MOEKIT_DEBUG": "1"})):
        r = runner.invoke(app, args, env=env)
        assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "config.json" in str(r.exception)
        assert "error:" not in r.output


def test_usage_errors_keep_their_exit_code():
    r = runner.invoke(app, ["train", "--bogus"])
    assert r.exit_code == 2 and "No such option" in r.output
    r = runner.invoke(app, ["analyze", "x", "--out", "y", "--behaviour", "a:b"])
    assert r.exit_code == 2 and "COLUMN:A:B" in r.output


def test_failed_analyze_leaves_no_lone_trace(trained_run, tmp_path, monkeypatch):
    import moekit.analyze.run as analyze_mod

    def half(model, windows, out, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        (out / "trace.parquet").write_bytes(b"half")
        raise ValueError("metrics failed")

    monkeypatch.setattr(analyze_mod, "analyze_model", half)
    out = tmp_path / "analysis"
    assert "metrics failed" in fails("analyze", trained_run, "--out", out, "--windows", "2", "--no-progress")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    fails("analyze", trained_run, "--out", out, "--windows", "2", "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_train_device_errors_are_one_line(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    assert "CUDA is not available" in fails(*TRAIN, "--out", out, "--device", "cuda")
    assert "device must be one of" in fails(*TRAIN, "--out", out, "--device", "gpu")
    assert "--bf16-on-cpu" in fails(*TRAIN, "--out", out, "--dtype", "bfloat16")
    assert not out.exists()  # nothing left behind
