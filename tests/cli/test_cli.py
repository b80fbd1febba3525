"""The `moekit` verbs end to end on the micro presets (seconds), and their bad-input errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moekit.cli.main import app

runner = CliRunner()
SMALL = ["--vocab-size", "320", "--set", "max_chars_per_domain=60000", "--set", "eval_windows=2", "--no-progress"]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_verbs():
    out = invoke("--help").output
    for verb in ("demo", "quickstart", "train", "eval", "generate", "inspect", "route"):
        assert verb in out


def test_train_inspect_eval_generate(tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--preset", "micro-moe", "--out", str(run), "--steps", "4", "--seq-len", "16", *SMALL)
    assert r.exit_code == 0, r.output
    assert "finished at step 4" in r.output
    assert (run / "checkpoint" / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()
    info = json.loads(invoke("inspect", str(run), "--json").output)
    assert info["layers"] == ["moe", "moe"] and info["num_experts"] == 4 and info["active"] < info["total"]
    ev = json.loads(invoke("eval", str(run), "--json", "--windows", "2").output)
    assert ev["step"] == 4 and set(ev["loss_per_label"]) == {"bible", "code", "wiki"}
    assert 0 < ev["loss"] < 10
    g = invoke("generate", str(run), "--prompt", "In the beginning", "--max-new-tokens", "5", "--temperature", "0")
    assert g.exit_code == 0 and g.output.startswith("In the beginning")


def test_set_overrides_router_and_resume(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "micro-moe",
        "--out",
        str(run),
        "--steps",
        "4",
        "--seq-len",
        "16",
        *SMALL,
        "--set",
        "router=topp",
        "--set",
        'router_args={"p": 0.5, "max_k": 3}',
    ]
    r = invoke(*args, "--stop-after", "2")
    assert "finished at step 2" in r.output, r.output
    info = json.loads(invoke("inspect", str(run), "--json").output)
    assert info["router"] == "topp" and info["router_args"] == {"p": 0.5, "max_k": 3}
    r = invoke(*args, "--resume")
    assert "finished at step 4" in r.output, r.output
    # top-p uses a variable number of experts: inspect reports what validation measured, not a nominal k
    last = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-1]
    measured = sum(last["experts_per_token"]) / len(last["experts_per_token"])
    info = json.loads(invoke("inspect", str(run), "--json").output)
    assert 1.0 <= measured <= 3.0 and info["variable_k"] and info["measured"]
    assert info["experts_per_token"] == measured and info["experts_per_token_step"] == 4
    assert "measured on validation at step 4" in invoke("inspect", str(run)).output


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--preset", "micro-moe", "--out", str(run), "--data", str(tmp_path / "missing.txt"), *SMALL)
    assert r.exit_code == 1 and "missing.txt" in r.output
    r = invoke("train", "--preset", "micro-moe", "--out", str(run), "--set", "colour=blue", *SMALL)
    assert r.exit_code == 1 and "no such config field" in r.output and "model.router" in r.output
    r = invoke("train", "--preset", "nano", "--out", str(run), *SMALL)
    assert r.exit_code == 1 and "known presets" in r.output
    assert not run.exists()
    r = invoke("inspect", str(tmp_path / "nothing"))
    assert r.exit_code == 1 and "does not exist" in r.output


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    base = ["train", "--preset", "micro-dense", "--out", str(run), "--steps", "2", "--seq-len", "16", *SMALL]
    assert invoke(*base).exit_code == 0
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    r = invoke(*base)
    assert r.exit_code == 1 and "--resume" in r.output
    r = invoke(*base, "--resume", "--set", "dim=64")
    assert r.exit_code == 1 and "model config differs" in r.output
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before


def test_user_text_files_with_labels(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "poems.txt").write_text("roses are red, violets are blue\n" * 200)
    (d / "recipes.txt").write_text("mix flour and water, bake for an hour\n" * 200)
    run = tmp_path / "run"
    r = invoke(
        "train",
        "--preset",
        "micro-moe",
        "--out",
        str(run),
        "--data",
        str(d),
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--vocab-size",
        "300",
        "--set",
        "eval_windows=2",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert "poems=" in r.output and "recipes=" in r.output


def test_demo_prints_router_table():
    out = invoke("demo", "--tokens", "64", "--dim", "16", "--hidden", "16").output
    for name in ("topk", "switch", "expert_choice", "deepseek", "topp", "null_experts", "hash", "random"):
        assert name in out


def test_analyze_writes_report_and_refuses_to_overwrite(tmp_path):
    run = tmp_path / "run"
    assert (
        invoke("train", "--preset", "micro-moe", "--out", str(run), "--steps", "2", "--seq-len", "16", *SMALL).exit_code
        == 0
    )
    out = tmp_path / "analysis"
    r = invoke("analyze", str(run), "--out", str(out), "--windows", "3", "--no-progress")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["specialization"]["labels"]) == {"bible", "code", "wiki"}
    assert metrics["super_experts"]["available"] is True
    html = (out / "report.html").read_text()
    assert "Specialisation" in html and "data:image/png;base64" in html
    r = invoke("analyze", str(run), "--out", str(out), "--no-progress")
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = invoke("analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--no-progress")
    assert r.exit_code == 1 and "does not exist" in r.output


def test_switching_router_drops_the_presets_router_args(tmp_path):
    run = tmp_path / "run"
    r = invoke(
        "train",
        "--preset",
        "micro-moe",
        "--out",
        str(run),
        "--steps",
        "1",
        "--seq-len",
        "16",
        *SMALL,
        "--set",
        "router=topp",
    )
    assert r.exit_code == 0, r.output
    info = json.loads(invoke("inspect", str(run), "--json").output)
    assert info["router"] == "topp" and info["router_args"] == {}


def test_mixture_of_depths_from_the_command_line(tmp_path):
    run = tmp_path / "mod"
    r = invoke("train", "--preset", "micro-moe", "--out", str(run), "--steps", "2", "--seq-len", "16",
               "--set", "mod_capacity=0.5", *SMALL)
    assert r.exit_code == 0, r.output
    assert json.loads(invoke("inspect", str(run), "--json").output)["layers"] == ["moe", "moe+mod 0.5"]
    assert "moe+mod 0.5" in invoke("inspect", str(run)).output
    g = invoke("generate", str(run), "--prompt", "In the beginning", "--max-new-tokens", "5", "--temperature", "0")
    assert g.exit_code == 0 and g.output.startswith("In the beginning")


def test_train_device_cpu_end_to_end_matches_the_default(_trained, tmp_path):
    """`--device cpu --dtype float32` is what training does without the flags: the same weights, bit for bit."""
    import torch

    from moekit.train import load_model, read_meta

    run = tmp_path / "run"
    r = invoke("train", "--preset", "micro-moe", "--out", str(run), "--steps", "2", "--seq-len", "16",
               "--device", "cpu", "--dtype", "float32", *SMALL)
    assert r.exit_code == 0, r.output
    assert read_meta(run)["train"]["device"] == "cpu"
    a, b = load_model(_trained).state_dict(), load_model(run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
