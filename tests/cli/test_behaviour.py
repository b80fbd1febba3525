"""CLI behaviour fixed by the hardening issue: router switches, absolute data paths, eval = training's
final validation, empty data files, quickstart continuation, export with the tokenizer, readable help."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app
from tests.cli.conftest import SMALL

runner = CliRunner()
TRAIN = ["train", "--preset", "micro-moe", "--steps", "2", "--seq-len", "16", *SMALL]


def ok(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_switching_router_starts_from_the_new_routers_defaults(tmp_path):
    # micro-moe's topk router has k=2; topp has no k: its arguments must not be merged into topp's
    # (both orders of the pairs: tests/train/test_overrides.py)
    ok(*TRAIN, "--out", tmp_path / "run", "--set", "router=topp", "--set", "router_args.p=0.5")
    info = json.loads(ok("inspect", tmp_path / "run", "--json"))
    assert info["router"] == "topp" and info["router_args"] == {"p": 0.5}


def test_same_router_keeps_the_presets_arguments():
    from moekit.models.presets import preset
    from moekit.train.overrides import apply_overrides

    cfgs = apply_overrides({"model": preset("micro-moe")}, ["router=topk", "router_args.noise=0.1"])
    assert cfgs["model"].router_args == {"k": 2, "noise": 0.1}
    cfgs = apply_overrides({"model": preset("micro-moe")}, ["experts=film", "router_args.k=1"])
    assert cfgs["model"].experts_args == {} and cfgs["model"].router_args == {"k": 1}


def test_relative_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "texts").mkdir(parents=True)
    (work / "texts" / "poems.txt").write_text("roses are red, violets are blue\n" * 200)
    (work / "texts" / "recipes.txt").write_text("mix flour and water, bake for an hour\n" * 200)
    monkeypatch.chdir(work)
    ok("train", "--preset", "micro-moe", "--out", "run", "--data", "texts", "--steps", "2", "--seq-len", "16",
       "--vocab-size", "300", "--set", "eval_windows=2", "--no-progress")
    meta = json.loads((work / "run" / "checkpoint" / "config.json").read_text())
    assert meta["data"]["spec"] == [str(work / "texts")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ev = json.loads(ok("eval", work / "run", "--json"))
    assert set(ev["loss_per_label"]) == {"poems", "recipes"}
    # a run made before paths were stored absolute (relative spec in its config) still resumes from its folder
    cfg_path = work / "run" / "checkpoint" / "config.json"
    meta["data"]["spec"] = ["texts"]
    cfg_path.write_text(json.dumps(meta))
    monkeypatch.chdir(work)
    out = ok("train", "--preset", "micro-moe", "--out", "run", "--data", "texts", "--steps", "3", "--seq-len", "16",
             "--vocab-size", "300", "--set", "eval_windows=2", "--no-progress", "--resume")
    assert "finished at step 3" in out


def test_eval_reproduces_trainings_final_validation_loss(tmp_path):
    run = tmp_path / "run"
    out = ok(*TRAIN, "--out", run, "--set", "eval_windows=3", "--set", "batch_size=5")
    printed = float(re.search(r"validation loss (\d+\.\d+)", out).group(1))
    logged = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-1]
    ev = json.loads(ok("eval", run, "--json"))
    assert ev["loss"] == logged["loss"] and ev["loss_per_label"] == logged["loss_per_label"]
    assert f"{ev['loss']:.4f}" == f"{printed:.4f}"
    assert f"validation loss {printed:.4f}" in ok("eval", run)


def test_empty_text_files_are_skipped_with_a_warning(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "poems.txt").write_text("roses are red, violets are blue\n" * 200)
    (d / "recipes.txt").write_text("mix flour and water, bake for an hour\n" * 200)
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n  \n")
    args = ["--steps", "2", "--seq-len", "16", "--vocab-size", "300", "--set", "eval_windows=2", "--no-progress"]
    r = runner.invoke(app, ["train", "--preset", "micro-moe", "--out", str(tmp_path / "run"), "--data", str(d), *args])
    assert r.exit_code == 0, r.output
    assert f"warning: {d / 'empty.txt'} holds no text; skipped" in r.stderr
    assert f"warning: {d / 'blank.txt'} holds no text; skipped" in r.stderr
    assert "empty=" not in r.stdout and "blank=" not in r.stdout
    ev = json.loads(ok("eval", tmp_path / "run", "--json"))
    assert set(ev["loss_per_label"]) == {"poems", "recipes"}
    only_empty = tmp_path / "nothing"
    only_empty.mkdir()
    (only_empty / "a.txt").write_text("")
    r = runner.invoke(app, ["train", "--preset", "micro-moe", "--out", str(tmp_path / "run2"), "--data",
                            str(only_empty), *args])
    assert r.exit_code == 1 and "error: no text in the data files" in r.stderr and "a.txt" in r.stderr
    assert not (tmp_path / "run2").exists()


def test_a_label_too_short_for_one_window_is_left_out_of_validation(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "poems.txt").write_text("roses are red, violets are blue\n" * 200)
    (d / "tiny.txt").write_text("hi")
    r = runner.invoke(app, ["train", "--preset", "micro-moe", "--out", str(tmp_path / "run"), "--data", str(d),
                            "--steps", "2", "--seq-len", "16", "--vocab-size", "300", "--set", "eval_windows=2",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "label 'tiny' has 2 validation tokens" in r.stderr and "tiny=" not in r.stdout


def test_quickstart_steps_continues_an_existing_folder(tmp_path, monkeypatch):
    import functools

    import moekit.train.quickstart as qs

    micro = functools.partial(
        qs.QuickstartConfig, batch_size=4, seq_len=16, vocab_size=320, max_chars_per_domain=60_000, eval_every=2,
        eval_windows=2, dense_preset="micro-dense", moe_preset="micro-moe", sample_tokens=4,
    )
    monkeypatch.setattr(qs, "QuickstartConfig", micro)
    out = tmp_path / "qs"
    ok("quickstart", "--out", out, "--steps", "2", "--no-progress")
    out3 = ok("quickstart", "--out", out, "--steps", "3", "--no-progress")
    assert "continuing the run" in out3 and "after 3 steps" in out3
    for name in ("dense", "moe"):
        meta = json.loads((out / name / "checkpoint" / "config.json").read_text())
        assert meta["step"] == 3 and meta["train"]["steps"] == 3
    r = runner.invoke(app, ["quickstart", "--out", str(out), "--steps", "2", "--no-progress"])
    assert r.exit_code == 1 and "trained for 3 steps" in r.stderr and "--out" in r.stderr


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))


def test_help_reads_as_written():
    import typer.main

    names = [()] + list(_commands(typer.main.get_command(app)))
    assert ("route", "train") in names and ("bench", "routers") in names and ("analyze",) in names
    for path in names:
        r = runner.invoke(app, [*path, "--help"], catch_exceptions=False)
        assert r.exit_code == 0, path
        text = r.output
        assert "<bool>" not in text, path
        assert not re.search(r"\{\w+\}", text.splitlines()[0]), (path, text.splitlines()[0])
        assert all(ord(c) < 0x2000 or c in "─│╭╮╰╯" for c in text), (path, text)  # no emoji
    assert "COLUMN:A:B" in runner.invoke(app, ["analyze", "--help"]).output
    assert "Usage: moekit eval [OPTIONS] RUN" in runner.invoke(app, ["eval", "--help"]).output
    assert "--check / --no-check" in runner.invoke(app, ["export", "--help"]).output


@pytest.mark.parametrize("family", ["mixtral"])
def test_export_carries_the_tokenizer_and_refuses_to_overwrite(trained_run, tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from moekit.data import BPETokenizer

    out = tmp_path / "hf"
    ok("export", trained_run, "--family", family, "--out", out)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = BPETokenizer.load(trained_run / "tokenizer.json")
    text = "In the beginning God created"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tok.eos_token == "<|endoftext|>"
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, ["export", str(trained_run), "--family", family, "--out", str(out)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "--force" in r.stderr and str(out) in r.stderr
    (out / "stale.txt").write_text("from an older export")
    ok("export", trained_run, "--family", family, "--out", out, "--force")
    assert sorted(p.name for p in out.iterdir()) == before  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_failed_export_leaves_no_half_folder(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import moekit.hf.export as export_mod

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "write_tokenizer", broken)
    r = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 1 and "No space left on device" in r.stderr
    assert list(tmp_path.iterdir()) == [trained_run]
