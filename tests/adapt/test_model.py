"""attach on a transformers Llama and on moekit's LM: parity with peft, KV cache, aux losses, gradients, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.adapt import (
    AdaptConfig,
    AuxLossMixin,
    adapted_layers,
    attach,
    aux_loss,
    check_trainable,
    merge_and_unload,
    method_config,
)
from tests.adapt.tiny import randomize_b, tiny_llama, tiny_moekit

pytest.importorskip("transformers")
IDS = torch.tensor([[5, 9, 17, 33, 4, 71, 8, 12], [3, 3, 40, 22, 90, 11, 6, 1]])


def test_one_expert_mixture_equals_peft_lora_on_the_same_weights():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    ours = {}
    for router, args in ((None, {}), ("topk", {"k": 1})):  # plain LoRA, and one expert under a top-1 router
        model = attach(copy.deepcopy(base), AdaptConfig(targets=["q_proj", "v_proj", "down_proj"], rank=4,
                                                        alpha=8.0, router=router, router_args=args))
        for name, layer in adapted_layers(model):
            peft_layer = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                layer.lora_A[0].copy_(peft_layer.lora_A["default"].weight)
                layer.lora_B[0].copy_(peft_layer.lora_B["default"].weight)
        assert len(list(adapted_layers(model))) == 6
        ours[router] = model(IDS).logits
    expected = theirs(IDS).logits
    assert not torch.allclose(expected, base(IDS).logits, atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(ours[None], expected)
    torch.testing.assert_close(ours["topk"], expected)


def test_zero_initialised_b_leaves_logits_unchanged():
    base = tiny_llama()
    before = base(IDS).logits
    for method in ("mixlora-proj", "hydralora", "smora", "loramoe"):
        model = attach(copy.deepcopy(base), method_config(method, rank=4))
        assert torch.equal(model(IDS).logits, before)
    # the block mixture sums sum_e g_e h with sum_e g_e = 1 up to rounding: equal to float precision
    block = attach(copy.deepcopy(base), method_config("mixlora", rank=4))
    torch.testing.assert_close(block(IDS).logits, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["mixlora", "mixlora-proj"])
def test_cached_generation_equals_the_uncached_forward(method):
    model = attach(tiny_llama(), method_config(method, num_experts=4, k=2, rank=4))
    randomize_b(model)
    prompt = IDS[:, :5]
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        step = model(IDS[:, 5:6], cache=out.cache, use_cache=True).logits[:, -1]
        full = model(IDS[:, :6], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, eos_token_id=None)
        ids = prompt
        for _ in range(4):  # greedy by hand, no cache
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_aux_losses_are_returned_and_gradients_reach_routers_and_adapters_only():
    model = attach(tiny_llama(), method_config("mixlora-proj", num_experts=4, k=2, rank=4))
    randomize_b(model)
    model.train()
    out = model(IDS, labels=IDS)
    layers = dict(adapted_layers(model))
    assert len(layers) == 6  # gate/up/down of 2 layers
    by_hand = sum(layer.last_aux["load_balance"] for layer in layers.values())
    torch.testing.assert_close(out.adapter_aux_loss, by_hand)
    torch.testing.assert_close(aux_loss(model), by_hand)
    assert 0.03 < float(by_hand.detach()) < 0.24  # 6 layers x 0.01 x E * sum_i f_i P_i (1 when balanced)
    again = model(IDS, labels=IDS)  # stored per forward, replaced (not accumulated)
    torch.testing.assert_close(again.adapter_aux_loss, by_hand)
    (out.loss + out.adapter_aux_loss).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name or ".router." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_moekit_lm_output_carries_adapter_aux_loss():
    model = attach(tiny_moekit(), method_config("mixlora", num_experts=4, k=2, rank=4))
    ids = IDS % 64
    out = model(ids, targets=ids)
    assert out.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, aux_loss(model))
    names = [n for n, _ in adapted_layers(model)]
    assert len(names) == 10 and "layers.0.mlp" in names and "layers.1.self_attn.o_proj" in names  # 2 FFN + 8 attn


def test_merge_and_unload_plain_lora_keeps_logits_and_refuses_mixtures():
    model = attach(tiny_llama(), method_config("lora", rank=4))
    randomize_b(model)
    adapted = model(IDS).logits
    merged = merge_and_unload(model)
    assert not list(adapted_layers(merged))
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    mix = attach(tiny_llama(), method_config("mixlora", rank=4))
    with pytest.raises(ValueError, match="route among experts and cannot be merged"):
        merge_and_unload(mix)


def test_trainer_mixin_adds_aux_loss():
    class FakeTrainer:
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = model(**inputs)
            return (out.loss, out) if return_outputs else out.loss

    class T(AuxLossMixin, FakeTrainer):
        pass

    model = attach(tiny_llama(), method_config("mixlora", rank=4))
    loss, out = T().compute_loss(model, {"input_ids": IDS, "labels": IDS}, return_outputs=True)
    torch.testing.assert_close(loss, out.loss + out.adapter_aux_loss)


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="'nope' matches no nn.Linear module of LlamaForCausalLM"):
        attach(tiny_llama(), AdaptConfig(targets=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="rank=33 is larger than the layer"):
        attach(tiny_llama(), AdaptConfig(targets=["q_proj"], rank=33))
    frozen = tiny_llama()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameter"):
        check_trainable(frozen)
    model = attach(tiny_llama(), AdaptConfig(targets=["re:.*layers\\.1\\.self_attn\\.(q|k)_proj"]))
    assert [n for n, _ in adapted_layers(model)] == [f"model.layers.1.self_attn.{p}_proj" for p in "qk"]
    with pytest.raises(ValueError, match="already has LoRA experts"):
        attach(model, AdaptConfig(targets=["v_proj"]))
    with pytest.raises(ValueError, match="num_experts=4 needs a router"):
        AdaptConfig(num_experts=4)
    with pytest.raises(KeyError, match="mixlora"):
        method_config("nosuch")
