"""`moekit inspect` on Hugging Face checkpoint directories: counts from the headers only."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.hf.inspect import describe, is_hf_dir
from tests.hf.tiny import tiny_model


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmoe")
    model = tiny_model("olmoe")
    model.save_pretrained(d)
    return d, model


def _counts(model, E: int, k: int) -> tuple[int, int, int]:
    """(total, routed expert, active) numbers of the checkpoint's tensors (buffers such as
    DeepSeek's score-correction bias included: they are in the file)."""
    state = model.state_dict()
    total = sum(t.numel() for t in state.values())
    experts = sum(t.numel() for n, t in state.items() if ".experts." in n)
    return total, experts, total - experts + experts * k // E


def test_describe_single_file(olmoe_dir):
    d, model = olmoe_dir
    info = describe(d)
    total, experts, active = _counts(model, 8, 2)
    assert info["family"] == "olmoe" and info["layers"] == ["moe", "moe"]
    assert (info["num_experts"], info["top_k"]) == (8, 2)
    assert (info["total"], info["experts_total"], info["active"]) == (total, experts, active)
    assert info["bytes_per_expert"] == 3 * 32 * 16 * 4  # gate, up, down of 32 x 16 in float32


def test_describe_sharded_deepseek_with_dense_layer(tmp_path):
    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    info = describe(tmp_path)
    total, experts, active = _counts(model, 8, 2)
    assert info["layers"] == ["dense", "moe"] and info["family"] == "deepseek_v3"
    assert (info["total"], info["experts_total"], info["active"]) == (total, experts, active)


def test_cli_inspect_reads_hf_dir(olmoe_dir):
    d, _ = olmoe_dir
    assert is_hf_dir(d)
    r = CliRunner().invoke(app, ["inspect", str(d), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["num_experts"] == 8
    r = CliRunner().invoke(app, ["inspect", str(d)])
    assert r.exit_code == 0 and "top-2" in r.output and "bytes per expert" in r.output


def test_cli_inspect_missing_weights_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    r = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 1 and "no safetensors weights" in r.output


def test_describe_fused_layout(olmoe_dir, tmp_path):
    """Checkpoints that store the fused in-memory layout (`experts.gate_up_proj [E, 2F, D]`) count the same."""
    from safetensors.torch import save_file

    d, model = olmoe_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fused, hub = describe(tmp_path), describe(d)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    for key in ("layers", "num_experts", "top_k", "total", "active", "experts_total", "bytes_per_expert"):
        assert fused[key] == hub[key], key
