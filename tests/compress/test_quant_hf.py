"""Quantized experts of patched Hugging Face models: the quantized model computes with the dequantized
weights, saves in the compressed-tensors format (llm-compressor's quantization_config) and loads back in
moekit with the same logits; bad input errors and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import moekit.hf as mh  # noqa: E402
from moekit.compress import calibrate, prune  # noqa: E402
from moekit.compress.quant_hf import hf_experts, load_quantized_hf, quantize_hf, save_quantized_hf  # noqa: E402
from tests.hf.tiny import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


X = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,bits", [("qwen3_moe", 8), ("mixtral", 4), ("deepseek_v3", 4)])
def test_quantized_hf_model_round_trips(family, bits, tmp_path):
    model = mh.patch(tiny_model(family))
    with torch.no_grad():
        full = model(X).logits
    quantize_hf(model, bits=bits, group_size=16)
    with torch.no_grad():
        got = model(X).logits
    # reference: the float model with every expert's weights replaced by their dequantized values
    ref = mh.patch(tiny_model(family))
    for (_, q), (_, f) in zip(hf_experts(model), hf_experts(ref), strict=True):
        w = q.experts.dequantize()
        with torch.no_grad():
            f.experts.gate_up_proj.copy_(w["gate_up_proj"])
            f.experts.down_proj.copy_(w["down_proj"])
    with torch.no_grad():
        torch.testing.assert_close(got, ref(X).logits, atol=1e-5, rtol=0)
    assert not torch.equal(got, full)  # quantization changed the weights
    err = (got - full).abs().max()
    assert err < (0.05 if bits == 8 else 0.5), err
    save_quantized_hf(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == ("naive-quantized" if bits == 8 else "pack-quantized")
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["num_bits"] == bits and group["weights"]["group_size"] == 16
    name = hf_experts(model)[0][0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor(f"{name}.0.gate_up_proj.{'weight' if bits == 8 else 'weight_packed'}")
    assert packed.dtype == (torch.int8 if bits == 8 else torch.int32)
    assert f"{name}.0.down_proj.weight_scale" in keys and f"{name}.gate_up_proj" not in keys
    loaded = load_quantized_hf(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, got, atol=1e-5, rtol=0)  # the reload uses the default attention


def test_pruned_then_quantized_saves_the_new_expert_count(tmp_path):
    model = mh.patch(tiny_model("olmoe"))
    prune(model, "frequency", calibrate(model, [X]), ratio=0.25)
    quantize_hf(model, bits=8, group_size=16)
    with torch.no_grad():
        want = model(X).logits
    save_quantized_hf(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["num_experts"] == 6
    loaded = load_quantized_hf(tmp_path / "q")
    assert all(layer.experts.num_experts == 6 for _, layer in hf_experts(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, want, atol=1e-5, rtol=0)  # the reload uses the default attention


def test_bad_input(tmp_path):
    model = mh.patch(tiny_model("mixtral"))
    with pytest.raises(ValueError, match="group_size 5 must divide"):
        quantize_hf(model, bits=8, group_size=5)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_hf(model, bits=9, group_size=16)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized_hf(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="not patched"):
        quantize_hf(tiny_model("mixtral"))
    quantize_hf(model, bits=4, group_size=16)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_hf(model, bits=4, group_size=16)
    (tmp_path / "plain").mkdir()
    tiny_model("mixtral").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no compressed-tensors quantization_config"):
        load_quantized_hf(tmp_path / "plain")
