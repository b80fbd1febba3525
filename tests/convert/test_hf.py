"""Hugging Face in/out: tiny dense Llama / Qwen2 / Qwen3 / Mistral models (built from configs, offline) convert
into moekit LMs with their logits, upcycle, and save as Mixtral / Qwen3-MoE checkpoints that transformers
reloads with moekit's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.convert import UpcycleConfig, from_hf_dense, load_dense, upcycle  # noqa: E402
from moekit.convert.run import convert_run  # noqa: E402
from moekit.hf.export import export_lm  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False)
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_dense(model_type: str, **over):
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    torch.manual_seed(0)
    cfg = getattr(transformers, cls[model_type])(**{**COMMON, **extra, **over})
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong norm mapping would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_dense_hf_models_convert_with_their_logits(model_type):
    hf = tiny_dense(model_type)
    lm = from_hf_dense(hf)
    assert lm.config.qk_norm == ("head" if model_type == "qwen3" else "none")
    with torch.no_grad():
        torch.testing.assert_close(lm(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,family", [("llama", "mixtral"), ("qwen2", "mixtral"), ("qwen3", "qwen3_moe")])
def test_upcycled_hf_model_saves_as_hf_moe_and_reloads_with_moekit_logits(model_type, family, tmp_path):
    hf = tiny_dense(model_type)
    src = tmp_path / "dense"
    hf.save_pretrained(str(src))
    summary = convert_run("upcycle", src, tmp_path / "moe", upcycle_cfg=UpcycleConfig(num_experts=4, k=2),
                          hf_family=family)
    assert summary.num_experts == 4 and summary.k == 2 and f"transformers {model_type}" in summary.source
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), local_files_only=True).eval()
    assert back.config.model_type == family
    moe = upcycle(load_dense(src).model, UpcycleConfig(num_experts=4, k=2)).eval()
    with torch.no_grad():
        theirs = back(IDS).logits
        torch.testing.assert_close(theirs, moe(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs, hf(IDS).logits, atol=1e-5, rtol=0)  # and the dense model's, at init


def test_hf_dense_folder_converts_into_a_moekit_checkpoint(tmp_path):
    from moekit.train.checkpoint import load_model, read_meta

    hf = tiny_dense("llama")
    hf.save_pretrained(str(tmp_path / "dense"))
    convert_run("upcycle", tmp_path / "dense", tmp_path / "moe", upcycle_cfg=UpcycleConfig(num_experts=2, k=1))
    moe = load_model(tmp_path / "moe").eval()
    assert moe.config.num_experts == 2 and read_meta(tmp_path / "moe")["convert"][0]["source"].startswith(
        "transformers llama")
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)


def test_granular_upcycle_exports_to_mixtral_with_folded_scale(tmp_path):
    moe = upcycle(from_hf_dense(tiny_dense("llama")), UpcycleConfig(num_experts=2, k=1, granularity=2)).eval()
    export_lm(moe, "mixtral", tmp_path / "out")  # checks the logits, with routed_scale 2 folded into down_proj
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, moe(IDS).logits, atol=1e-5, rtol=0)


def test_what_moekit_cannot_express_is_named(tmp_path):
    with pytest.raises(ValueError, match="mlp_bias=True"):
        from_hf_dense(tiny_dense("llama", mlp_bias=True))
    with pytest.raises(ValueError, match="attention_bias=True"):
        from_hf_dense(tiny_dense("llama", attention_bias=True))
    qwen2 = tiny_dense("qwen2")
    with torch.no_grad():
        qwen2.model.layers[1].self_attn.q_proj.bias.fill_(0.1)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.bias is not zero"):
        from_hf_dense(qwen2)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=96))
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a dense decoder moekit converts"):
        convert_run("upcycle", tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    hf = tiny_dense("llama")
    hf.save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="needs calibration data"):
        convert_run("split", tmp_path / "llama", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "llama"]
