"""`moekit adapt` and `moekit adapt merge` on the CLI suite's micro run."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from moekit.adapt import load_adapters
from moekit.cli.main import app
from moekit.train.checkpoint import load_model


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_adapt_trains_saves_and_merges(trained_run, tmp_path):
    out = tmp_path / "lora"
    r = invoke("adapt", "lora", trained_run, "--out", out, "--targets", "q_proj,v_proj", "--rank", "4",
               "--steps", "2", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    assert "loss all" in r.output and "trainable" in r.output
    names = {f.name for f in out.iterdir()}
    assert names == {"adapt_config.json", "adapters.safetensors", "adapter_config.json",
                     "adapter_model.safetensors", "adapt_report.json"}
    report = json.loads((out / "adapt_report.json").read_text())
    base = load_model(trained_run)
    attn = base.layers[0].self_attn
    q_out, v_out = attn.q_proj.out_features, attn.v_proj.out_features
    assert report["trainable"] == base.config.n_layers * 4 * (2 * base.config.dim + q_out + v_out)  # r (in + out)
    adapted = load_adapters(load_model(trained_run), out)
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    expected = adapted(ids).logits
    merged = tmp_path / "merged"
    m = invoke("adapt", "merge", out, "--out", merged)
    assert m.exit_code == 0, m.output
    torch.testing.assert_close(load_model(merged)(ids).logits, expected, atol=1e-5, rtol=1e-5)
    e = invoke("eval", merged)
    assert e.exit_code == 0 and "validation loss" in e.output, e.output


def test_adapt_errors_write_nothing(trained_run, tmp_path):
    dst = tmp_path / "out" / "a"
    cases = [
        (["adapt", "nope", trained_run, "--out", dst], "unknown adapt method 'nope'"),
        (["adapt", "mixlora-proj", trained_run, "--out", dst, "--targets", "nosuch"], "matches no nn.Linear"),
        (["adapt", "mixlora", trained_run, "--out", dst], "'mlp' matches no feed-forward block"),  # an MoE run
        (["adapt", "lora", trained_run, "--out", dst, "--targets", "q_proj", "--rank", "100"], "rank=100 is larger"),
    ]
    for args, msg in cases:
        r = invoke(*args)
        assert r.exit_code == 1 and msg in r.output, r.output
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
        assert not dst.exists()
    ok = invoke("adapt", "mixlora-proj", trained_run, "--out", dst, "--targets", "q_proj", "--experts", "2", "--k", "1",
                "--rank", "2", "--steps", "1", "--no-eval")
    assert ok.exit_code == 0, ok.output
    m = invoke("adapt", "merge", dst, "--out", tmp_path / "m")
    assert m.exit_code == 1 and "cannot be merged" in m.output and not (tmp_path / "m").exists(), m.output


def test_adapt_loramoe_trains_with_domain_groups(trained_run, tmp_path):
    out = tmp_path / "loramoe"
    r = invoke("adapt", "loramoe", trained_run, "--out", out, "--targets", "q_proj", "--experts", "2", "--rank", "2",
               "--steps", "2", "--no-eval")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapt_config.json").read_text())["config"]
    assert cfg["method"] == "loramoe" and cfg["expert_groups"] == 2 and cfg["localized_balance"] == 0.1
    assert not (out / "adapter_config.json").exists()  # a mixture: no peft files
