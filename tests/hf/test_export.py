"""`moekit export RUN --to hf --family F`: transformers loads the result with identical logits, or
the export fails with the reasons. Also the LM's `qk_norm` option the OLMoE/Qwen3 targets need."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.hf.export import ExportError, export_lm, hf_config_for
from moekit.models import LMConfig, MoELM
from moekit.train import save_checkpoint
from tests.helpers import TINY_LM

BASE = dict(TINY_LM, vocab_size=96, num_experts=8, expert_hidden=16)
TARGETS = {
    "mixtral": dict(router_args={"k": 2}),
    "olmoe": dict(qk_norm="full", router_args={"k": 2, "normalize": False}),
    "qwen3_moe": dict(qk_norm="head", first_k_dense=1, tie_embeddings=False, router_args={"k": 3}),
    "glm4_moe": dict(router="deepseek", num_shared_experts=1, first_k_dense=1,
                     router_args={"k": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}),
}


def lm(**overrides) -> MoELM:
    """A tiny moekit LM with spread router weights and non-trivial norm weights."""
    torch.manual_seed(0)
    model = MoELM(LMConfig(**{**BASE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(std=0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_cli_export_loads_in_transformers_with_identical_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lm(**TARGETS[family])
    save_checkpoint(tmp_path / "run", model, {"step": 0})
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--to", "hf", "--family", family,
                                 "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager").eval()
    assert hf.config.model_type == family
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, model(ids()).logits, atol=1e-5, rtol=0)
    prompt = ids()[:, :4]
    want = model.generate(prompt, 6)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_deepseek_v3_export_fails_with_the_reason(tmp_path):
    model = lm(router="deepseek", router_args={"k": 2, "n_group": 2, "topk_group": 1})
    with pytest.raises(ExportError, match="multi-head latent attention"):
        export_lm(model, "deepseek_v3", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_checkpoint(tmp_path / "run", model, {"step": 0})
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--family", "deepseek_v3"])
    assert r.exit_code == 1 and "multi-head latent attention" in r.output


def test_inexpressible_models_list_every_reason(monkeypatch):
    cfg = LMConfig(**BASE, router="topp", capacity_factor=1.0)
    with pytest.raises(ExportError, match="router 'topp'.*capacity_factor"):
        hf_config_for(cfg, "mixtral")
    with pytest.raises(ExportError, match="qk_norm='head'.*qk_norm='none'"):
        hf_config_for(LMConfig(**BASE), "qwen3_moe")
    with pytest.raises(ExportError, match="normalize=True"):
        hf_config_for(LMConfig(**BASE, router_args={"k": 2, "normalize": False}), "mixtral")
    with pytest.raises(ExportError, match="olmoe routing fixes selection_bias=False.*selection_bias=True"):
        hf_config_for(LMConfig(**BASE, qk_norm="full", router_args={"k": 2, "selection_bias": True}), "olmoe")
    with pytest.raises(ExportError, match="dense blocks \\[0\\]"):
        hf_config_for(LMConfig(**BASE, qk_norm="full", first_k_dense=1), "olmoe")
    with pytest.raises(ExportError, match="first k blocks dense; the model has dense blocks \\[0, 2\\]"):
        hf_config_for(LMConfig(**{**BASE, "n_layers": 4}, router="deepseek", first_k_dense=1, moe_every=2), "glm4_moe")
    with pytest.raises(ExportError, match="known: deepseek_v3, glm4_moe, mixtral, olmoe, qwen3_moe"):
        hf_config_for(LMConfig(**BASE), "gpt2")
    # a router argument the family does not name is expressible only at the router's default
    with monkeypatch.context() as m:
        import dataclasses

        import moekit.hf.export as export_mod

        fam = export_mod.get_family("mixtral")
        lacking = dataclasses.replace(
            fam, router_args=lambda c: {k: v for k, v in fam.router_args(c).items() if k != "normalize"}
        )
        m.setattr(export_mod, "get_family", lambda name: lacking if name == "mixtral" else fam)
        hf_config_for(LMConfig(**BASE, router_args={"k": 2}), "mixtral")  # the default: fine
        with pytest.raises(ExportError, match="mixtral routing has no equivalent of normalize=False"):
            hf_config_for(LMConfig(**BASE, router_args={"k": 2, "normalize": False}), "mixtral")
    moekit_only = LMConfig(**BASE, mod_capacity=0.5, share_blocks=True, experts="film")
    with pytest.raises(ExportError, match="mixture-of-depths.*WideNet.*experts='film'"):
        hf_config_for(moekit_only, "mixtral")


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_lm_qk_norm_option(qk_norm):
    model = lm(qk_norm=qk_norm)
    attn = model.layers[0].self_attn
    hd = model.config.head_dim
    assert attn.q_norm.weight.shape == ((hd,) if qk_norm == "head" else (4 * hd,))
    assert attn.k_norm.weight.shape == ((hd,) if qk_norm == "head" else (2 * hd,))
    x = ids()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    plain = lm()
    assert not hasattr(plain.layers[0].self_attn, "q_norm")  # default "none": unchanged model
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        LMConfig(**BASE, qk_norm="layer")


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe"])
def test_export_checks_odd_expert_widths(family, tmp_path):
    """Before: the logits check died in transformers' grouped_mm experts ("strides should be multiple
    of 16 bytes") for expert width 13. The check now runs transformers' eager experts."""
    from transformers import AutoModelForCausalLM

    model = lm(**{**TARGETS[family], "expert_hidden": 13, "ffn_hidden": 13})
    export_lm(model, family, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, model(ids()).logits, atol=1e-5, rtol=0)


def test_export_killed_between_renames_is_put_back_before_the_overwrite_check(tmp_path):
    out = tmp_path / "hf"
    (tmp_path / "hf.old").mkdir()  # replace_dir moved the old export aside, then the process died
    (tmp_path / "hf.old" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--force"):
        export_lm(lm(), "mixtral", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mixtral", dict(router_args={"k": 2, "routed_scale": 2.0}, ffn_out_mult=1.5)),
        ("qwen3_moe", dict(TARGETS["qwen3_moe"], router_args={"k": 3, "routed_scale": 3.0}, ffn_out_mult=0.5)),
    ],
)
def test_output_scales_are_folded_into_down_projections(family, overrides):
    """routed_scale and ffn_out_mult have no transformers field: the export multiplies them into the down
    projections (routed experts: both; dense MLPs: ffn_out_mult), with the same logits."""
    model = lm(**overrides)
    from moekit.hf.export import check_logits, hf_state_dict, to_hf

    hf = to_hf(model, family)
    assert check_logits(model, hf) < 1e-4
    state, own = hf_state_dict(model, family), model.state_dict()
    scale = overrides["router_args"]["routed_scale"] * overrides["ffn_out_mult"]
    key = next(k for k in own if k.endswith("mlp.experts.down_proj"))
    assert torch.equal(state["model." + key], own[key] * scale)
    assert own[key].data_ptr() != state["model." + key].data_ptr()  # the model's own weights are untouched
