"""Patched models equal transformers bit for bit at odd sizes (hidden 40, 5-6 experts, top-3, expert
width 13, dense first layers, groups, random selection bias), on left-padded batches, in cached
generation, in bfloat16, and give transformers the router logits its load-balancing loss reads."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit.hf as mh
from moekit.layers.activations import get_activation
from tests.hf.test_patch import FAMILIES, FIXED_K
from tests.hf.tiny import tiny_model

EXACT = dict(atol=0, rtol=0)
# families whose transformers model computes a load-balancing loss from the recorded router logits
AUX_FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "jamba", "granitemoe", "minimax", "flex_olmo", "mellum",
                "qwen3_next", "granitemoeshared", "granitemoehybrid", "phimoe", "qwen3_vl_moe", "qwen3_5_moe",
                "glm4v_moe", "granitemoe_swa"]


def left_padded(seed: int = 0, B: int = 3, L: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] and attention mask [B, L]: row b has b * 2 pad tokens (id 0) on the left."""
    ids = torch.randint(3, 96, (B, L), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        ids[b, : 2 * b] = 0
        mask[b, : 2 * b] = 0
    return ids, mask


def _patched(model, **kw):
    return mh.patch(copy.deepcopy(model), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_sizes_left_padded_logits_and_generation(family):
    ref = tiny_model(family, odd=True)
    ids, mask = left_padded()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        for backend in ("auto", "eager"):  # auto is `loop` on CPU
            got = _patched(ref, backend=backend)(ids, attention_mask=mask).logits
            keep = mask.bool()
            torch.testing.assert_close(got[keep], want[keep], **EXACT, msg=f"{family} {backend}")
    patched = _patched(ref)
    assert all(layer.moe.router.k == FIXED_K.get(family, 3) for layer in mh.patched_layers(patched))
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(patched.generate(ids, **kw), ref.generate(ids, **kw), **EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_equal_with_the_default_backend(family):
    """bfloat16 (float32 routers and biases where transformers keeps them): the same logits bit for
    bit with the default backend and with eager."""
    ref = tiny_model(family, odd=True, dtype=torch.bfloat16)
    ids, mask = left_padded(1)
    keep = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits[keep]
        for backend in ("auto", "eager"):
            got = _patched(ref, backend=backend)(ids, attention_mask=mask).logits[keep]
            torch.testing.assert_close(got, want, **EXACT, msg=f"{family} {backend}")


@pytest.mark.parametrize("family", FAMILIES)
def test_output_router_logits_and_aux_loss_are_transformers(family):
    ref = tiny_model(family, odd=True)
    patched = _patched(ref)
    ids, mask = left_padded(2)
    kw = dict(attention_mask=mask, labels=ids, output_router_logits=True)
    with torch.no_grad():
        want, got = ref(ids, **kw), patched(ids, **kw)
    assert len(got.router_logits) == len(want.router_logits) == len(mh.patched_layers(patched))
    for g, w in zip(got.router_logits, want.router_logits, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **EXACT)
    if family in AUX_FAMILIES:
        assert want.aux_loss is not None and want.aux_loss > 0
    else:
        assert getattr(want, "aux_loss", None) is None
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, **EXACT)
    torch.testing.assert_close(got.loss, want.loss, **EXACT)  # includes router_aux_loss_coef * aux_loss


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_generate_with_output_router_logits(family):
    ref = tiny_model(family)
    patched = _patched(ref)
    for m in (ref, patched):
        m.config.output_router_logits = True  # every forward of generate records and computes aux_loss
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(patched.generate(prompt, **kw), ref.generate(prompt, **kw), **EXACT)


def test_router_logits_after_unpatch():
    """transformers installs its recording hooks on the first forward that records; done while
    patched, the restored blocks have them too."""
    model = tiny_model("qwen3_moe")
    ids = left_padded()[0]
    with torch.no_grad():
        want = model(ids, output_router_logits=True).aux_loss
        mh.patch(model)  # hooks already installed: still one set, no logits recorded twice
        out = model(ids, output_router_logits=True)
        assert len(out.router_logits) == 2
        torch.testing.assert_close(out.aux_loss, want, **EXACT)
        fresh = mh.patch(tiny_model("qwen3_moe"))
        out = fresh(ids, output_router_logits=True)
        assert len(out.router_logits) == 2
        torch.testing.assert_close(out.aux_loss, want, **EXACT)
        mh.unpatch(fresh)
        out = fresh(ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, want, **EXACT)


@pytest.mark.parametrize("bad", [dict(router="top_p"), dict(router="topp", router_args={"q": 1}),
                                 dict(backend="warp-speed"), dict(router_args={"k": 99})])
def test_a_failed_repatch_keeps_the_previous_patch(bad):
    ref = tiny_model("olmoe")
    model = mh.patch(copy.deepcopy(ref), router="topp", router_args={"p": 0.6, "max_k": 4})
    layers, keys = mh.patched_layers(model), list(model.state_dict())
    ids = left_padded()[0]
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises((KeyError, ValueError, TypeError)):
        mh.patch(model, **bad)
    assert mh.patched_layers(model) == layers and list(model.state_dict()) == keys
    assert type(layers[0].moe.router).router_name == "topp"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, **EXACT)
    with torch.no_grad():  # the token-id hook is back: a router that reads token ids still gets them
        mh.patch(model, router="hash", router_args={"k": 2})(ids)
    mh.unpatch(model)
    assert type(model.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock" and not model._forward_pre_hooks
    fresh = copy.deepcopy(ref)
    with pytest.raises((KeyError, ValueError, TypeError)):
        mh.patch(fresh, **bad)
    assert not mh.is_patched(fresh) and not fresh._forward_pre_hooks


def test_a_failed_repatch_restores_the_config():
    """A re-patch first unpatches, which writes a changed top-k into the config; a failure puts it back."""
    model = mh.patch(tiny_model("olmoe"), router_args={"k": 3})
    assert model.config.num_experts_per_tok == 2
    with pytest.raises(KeyError, match="unknown router"):
        mh.patch(model, router="top_p")
    assert model.config.num_experts_per_tok == 2 and mh.patched_layers(model)[0].moe.router.k == 3


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_hy_v4_clamped_swiglu_is_exact(limit):
    from transformers import AutoModelForCausalLM

    from tests.hf.tiny import odd_config

    config = odd_config("hy_v4")
    config.swiglu_limit = limit
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation="eager").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".gate.weight"):
                p.normal_(std=0.5)
            if name.endswith("experts.gate_up_proj"):
                p.normal_(std=0.2)  # pre-activations of up to ~3: clamps bind at every limit here
    patched = _patched(ref)
    experts = mh.patched_layers(patched)[0].moe.experts
    assert experts.activation == "clamped_swiglu" and experts.act.args()["limit"] == limit
    ids = left_padded()[0]
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(patched(ids).logits, want, **EXACT)
        for layer in mh.patched_layers(patched):  # without the clamp: not the same model
            layer.moe.experts.act = get_activation("silu")
        assert (patched(ids).logits - want).abs().max() > 1e-3
