"""Patched transformers MoE models equal transformers' own forward (eager experts), share its
tensors, generate the same tokens, train the same, and save/reload identically."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit.hf as mh
from moekit.layers import Experts, MoE
from moekit.layers.dispatch import grouped_mm_available
from tests.hf.tiny import auto_class, tiny_model

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "jamba", "granitemoe",
            "minimax", "flex_olmo", "mellum", "qwen3_next", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "dots1",
            "deepseek_v32", "solar_open", "hy_v4", "granitemoeshared", "granitemoehybrid",
            "exaone_moe", "phimoe", "qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe",
            "granitemoe_swa"]
# families whose transformers block fixes k whatever `num_experts_per_tok` says
FIXED_K = {"phimoe": 2}
TOL = dict(atol=1e-5, rtol=0)


def ids(seed: int = 0, B: int = 2, L: int = 12) -> torch.Tensor:
    return torch.randint(3, 96, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def pair(request):
    """(reference transformers model, patched copy with the same weights)."""
    ref = tiny_model(request.param)
    patched = mh.patch(copy.deepcopy(ref))
    return ref, patched


def test_every_covered_family_is_tested():
    assert sorted(FAMILIES) == mh.family_names()


def test_patch_shares_tensors_and_keeps_names():
    model = tiny_model("qwen2_moe")
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    mh.patch(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)
    assert list(model.state_dict()) == keys
    layer = model.model.layers[0].mlp
    assert isinstance(layer, mh.PatchedMoE) and isinstance(layer.moe, MoE)
    assert isinstance(layer.moe.experts, Experts)
    assert layer.moe.experts.gate_up_proj is before["model.layers.0.mlp.experts.gate_up_proj"]
    assert layer.moe.router.weight is before["model.layers.0.mlp.gate.weight"]
    assert layer.moe.shared_expert_gate.weight is before["model.layers.0.mlp.shared_expert_gate.weight"]


def test_deepseek_shares_bias_and_keeps_dense_layers():
    model = mh.patch(tiny_model("deepseek_v3"))
    assert not isinstance(model.model.layers[0].mlp, mh.PatchedMoE)  # first_k_dense_replace=1
    layer = model.model.layers[1].mlp
    assert layer.moe.router.e_score_correction_bias is model.model.layers[1].mlp.gate.e_score_correction_bias
    assert layer.moe.router.bias_update_rate == 0.0 and layer.moe.router.routed_scaling_factor == 2.5
    assert dict(model.named_buffers())["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_state_dict_keys_and_tensors_are_transformers(pair):
    ref, patched = pair
    want, got = ref.state_dict(), patched.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_logits_equal_without_and_with_kv_cache(pair):
    ref, patched = pair
    x = ids()
    with torch.no_grad():
        full_ref, full = ref(x).logits, patched(x).logits
        torch.testing.assert_close(full, full_ref, **TOL)
        # prefix with a cache, then the rest one step at a time through the cache
        out_ref, out = ref(x[:, :7], use_cache=True), patched(x[:, :7], use_cache=True)
        steps_ref, steps = [], []
        for t in range(7, x.shape[1]):
            out_ref = ref(x[:, t : t + 1], past_key_values=out_ref.past_key_values, use_cache=True)
            out = patched(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps_ref.append(out_ref.logits)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(steps_ref, 1), **TOL)
    routings = mh.routings(patched)
    assert all(r is not None and r.expert_ids.shape == (2, 2) for r in routings)  # last step: B=2 tokens, k=2


def test_greedy_generation_identical(pair):
    ref, patched = pair
    prompt = ids(1, B=2, L=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(patched.generate(prompt, **kw), ref.generate(prompt, **kw), atol=0, rtol=0)


def test_gradients_equal_for_a_training_step(pair):
    ref, patched = pair
    ref.train()
    patched.train()
    x = ids(2)
    torch.manual_seed(0)  # the same random draws in both (PhiMoE samples its experts in training)
    ref(x, labels=x).loss.backward()
    torch.manual_seed(0)
    patched(x, labels=x).loss.backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}
    for k, p in patched.named_parameters():
        assert (p.grad is None) == (grads_ref[k] is None), k
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads_ref[k], **TOL, msg=k)


def test_save_round_trip(pair, tmp_path):
    _, patched = pair
    mh.save(patched, tmp_path)
    loaded = auto_class(patched.config).from_pretrained(tmp_path, experts_implementation="eager").eval()
    x = ids(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, patched(x).logits, **TOL)


@pytest.mark.parametrize("backend", ["eager", "loop", "grouped"])
def test_any_dispatch_backend(backend):
    if backend == "grouped" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch.nn.functional.grouped_mm not in this torch")
    ref = tiny_model("olmoe")
    patched = mh.patch(copy.deepcopy(ref), backend=backend)
    assert patched.model.layers[0].mlp.moe.experts.backend == backend
    x = ids(4)
    with torch.no_grad():
        torch.testing.assert_close(patched(x).logits, ref(x).logits, **TOL)


def test_unpatch_restores_the_original_modules():
    model = tiny_model("mixtral")
    originals = [layer.mlp for layer in model.model.layers]
    x = ids(5)
    with torch.no_grad():
        before = model(x).logits
    mh.patch(model)
    assert mh.is_patched(model)
    mh.unpatch(model)
    assert not mh.is_patched(model)
    assert [layer.mlp for layer in model.model.layers] == originals
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not patched"):
        mh.unpatch(model)


def test_unsupported_model_lists_the_supported_families():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="supported families: .*deepseek_v3.*mixtral.*olmoe.*qwen2_moe.*qwen3_moe"):
        mh.patch(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_config_keys_exist_in_the_transformers_config(name):
    """The config fields a family names (E, k, ...) exist in its transformers config class, so `hf.save`
    writes E where transformers reads it (exaone_moe inherited DeepSeek's `n_routed_experts` by mistake)."""
    from transformers import AutoConfig

    from moekit.hf.families import get_family

    fam = get_family(name)
    for model_type in fam.model_types:
        cfg = AutoConfig.for_model(model_type).get_text_config()  # multimodal: the text model's config
        for key in (fam.num_experts_key, *fam.config_keys.values()):
            assert hasattr(cfg, key), f"{model_type}: {key}"


def test_save_writes_e_where_transformers_reads_it(tmp_path):
    import json

    model = tiny_model("exaone_moe")
    mh.patch(model)
    mh.save(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["num_experts"] == model.config.num_experts and "n_routed_experts" not in saved
