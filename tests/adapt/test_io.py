"""Saving and loading adapters (moekit's format and peft's)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moekit.adapt import (
    adapted_layers,
    attach,
    load_adapters,
    load_peft_expert,
    method_config,
    save_adapters,
    save_peft,
)
from tests.adapt.tiny import randomize_b, tiny_llama, tiny_moekit

pytest.importorskip("transformers")
IDS = torch.tensor([[5, 9, 17, 33, 4, 61, 8, 12]])


@pytest.mark.parametrize("method", ["mixlora", "mixlora-proj", "hydralora", "smora", "loramoe"])
def test_save_load_restores_logits_exactly(tmp_path, method):
    base = tiny_moekit()
    model = attach(copy.deepcopy(base), method_config(method, rank=4))
    randomize_b(model)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if layer.router is not None:
                layer.router.weight.normal_()  # trained routers differ from a fresh init
    expected = model(IDS).logits
    save_adapters(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapt_config.json").read_text())
    assert meta["config"]["method"] == method and len(meta["layers"]) == len(list(adapted_layers(model)))
    loaded = load_adapters(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(loaded(IDS).logits, expected)


def test_load_refuses_tensors_that_do_not_match_the_config(tmp_path):
    model = attach(tiny_moekit(), method_config("mixlora-proj", rank=4, targets=["up_proj"]))
    save_adapters(model, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapt_config.json").read_text())
    cfg["config"]["targets"] = ["up_proj", "down_proj"]  # the tensors no longer cover the config
    (tmp_path / "b" / "adapt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the model's adapters"):
        load_adapters(tiny_moekit(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="adapt_config.json: no such file"):
        load_adapters(tiny_moekit(), tmp_path / "none")


def test_plain_lora_saves_in_peft_format_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = attach(copy.deepcopy(base), method_config("lora", rank=4, alpha=12.0))
    randomize_b(model)
    expected = model(IDS).logits
    save_peft(model, tmp_path / "p")
    assert {f.name for f in (tmp_path / "p").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(theirs(IDS).logits, expected)
    mix = attach(tiny_llama(), method_config("mixlora", rank=4))
    with pytest.raises(ValueError, match="peft's LoRA format holds one update per layer"):
        save_peft(mix, tmp_path / "q")


def test_a_peft_adapter_loads_as_an_expert(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "p")
    expected = theirs(IDS).logits
    lora = load_peft_expert(attach(copy.deepcopy(base), method_config("lora", rank=4, alpha=16.0,
                                                                      targets=["gate_proj", "up_proj", "down_proj"])),
                            tmp_path / "p")
    torch.testing.assert_close(lora(IDS).logits, expected)  # alpha 16 vs 8: the scaling is folded into B
    mix = attach(copy.deepcopy(base), method_config("mixlora-proj", num_experts=3, rank=4, alpha=8.0))
    before = {n: layer.lora_A[0].clone() for n, layer in adapted_layers(mix)}
    load_peft_expert(mix, tmp_path / "p", expert=2)
    for name, layer in adapted_layers(mix):
        src = theirs.base_model.model.get_submodule(name)
        assert torch.equal(layer.lora_A[2], src.lora_A["default"].weight)
        assert torch.equal(layer.lora_B[2], src.lora_B["default"].weight)
        assert torch.equal(layer.lora_A[0], before[name]) and not layer.lora_B[0].any()
    with pytest.raises(ValueError, match="rank r=4 differs from the experts' rank 8"):
        load_peft_expert(attach(copy.deepcopy(base), method_config("mixlora-proj", rank=8)), tmp_path / "p")
