"""`moekit inspect` on Hugging Face checkpoint directories: counts from the headers only."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.hf.families import family_names, get_family
from moekit.hf.inspect import BUFFERS, describe, is_hf_dir
from tests.hf.tiny import tiny_model


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmoe")
    model = tiny_model("olmoe")
    model.save_pretrained(d)
    return d, model


def _counts(model, E: int, k: int) -> tuple[int, int, int]:
    """(total, routed expert, active) parameters of the live model (`named_parameters()`: buffers
    such as DeepSeek's score-correction bias are not parameters, though they are in the file)."""
    params = dict(model.named_parameters())
    total = sum(t.numel() for t in params.values())
    experts = sum(t.numel() for n, t in params.items() if ".experts." in n)
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


def _live_counts(model, family: str) -> dict:
    """What inspect should report, from the live model: parameters by `named_parameters()`, routed
    experts = the parameters of each sparse block's experts module (the family table's names)."""
    fam = get_family(family)
    cfg = model.config.get_text_config()
    k = cfg.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    per_layer, sizes = {}, set()
    for name, module in model.named_modules():
        if type(module).__name__ == fam.block:
            layer = int(name.split("layers.")[1].split(".")[0])
            experts = list(getattr(module, fam.experts).parameters())  # fused: [E, ...] each
            per_layer[layer] = sum(p.numel() for p in experts)
            sizes |= {p.shape[0] for p in experts}
    (E,) = sizes
    experts = sum(per_layer.values())
    active = total - experts + sum(p * k // E for p in per_layer.values())
    buffers = sum(b.numel() for n, b in model.state_dict().items() if n not in dict(model.named_parameters()))
    layers = ["moe" if i in per_layer else "dense" for i in range(cfg.num_hidden_layers)]
    return dict(total=total, experts_total=experts, active=active, experts_active=active - (total - experts),
                num_experts=E, top_k=k, layers=layers, buffers=buffers)


@pytest.mark.parametrize("family", family_names())
def test_counts_equal_the_live_models_parameters_in_every_family(family, tmp_path):
    """Before: Granite's experts (`input_linear`/`output_linear`) were not seen, MiniMax's decay buffers
    counted 10x the parameters, DeepSeek-style `e_score_correction_bias` buffers counted as parameters."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    info, want = describe(tmp_path), _live_counts(model, family)
    assert info["family"] == family
    assert {key: info[key] for key in want} == want
    assert info["experts_total"] > 0


@pytest.mark.parametrize("family", family_names())
def test_buffer_names_cover_every_family(family):
    """Every non-parameter tensor a covered family saves has its last name part in BUFFERS, and no
    parameter of any covered family has (else inspect would miscount it)."""
    model = tiny_model(family)
    params = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    saved = {n.rsplit(".", 1)[-1] for n in model.state_dict()} - params
    assert saved <= BUFFERS, saved - BUFFERS
    assert not params & BUFFERS
