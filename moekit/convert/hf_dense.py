"""Hugging Face dense decoders (Llama, Mistral, Qwen2, Qwen3) as moekit dense LMs, so that every conversion
method takes them. The layouts are the same (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...; moekit
names drop the `model.` prefix), so the key map is one rule; what moekit's LM cannot express (attention or MLP
biases that are not zero, sliding windows, scaled RoPE, another head width) is an error that names it.
The converted model gives the transformers model's logits (tests/convert/test_hf.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.hf.families import ACTIVATIONS
from moekit.models import LMConfig, MoELM
from moekit.utils.deps import require

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # transformers model types this module converts
QK_NORM = {"qwen3": "head"}  # model types with per-head q/k RMSNorm


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a transformers checkpoint folder (config.json with a `model_type`)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        return "model_type" in json.loads(f.read_text())
    except (json.JSONDecodeError, OSError, TypeError):
        return False


def lm_config_from_hf(config: Any) -> LMConfig:
    """The moekit `LMConfig` of a transformers dense decoder config; ValueError listing every difference."""
    mt = getattr(config, "model_type", None)
    if mt not in DENSE_TYPES:
        raise ValueError(
            f"transformers model_type {mt!r} is not a dense decoder moekit converts (known: {', '.join(DENSE_TYPES)};"
            " the methods need a Llama-style gated SwiGLU feed-forward)"
        )
    reasons = []
    dim, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or dim // heads
    if head_dim * heads != dim:
        reasons.append(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={dim}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        reasons.append(f"hidden_act={act!r} (known: {sorted(ACTIVATIONS)})")
    if getattr(config, "mlp_bias", False):
        reasons.append("mlp_bias=True (moekit feed-forwards have no biases)")
    if mt in ("llama", "qwen3") and getattr(config, "attention_bias", False):
        reasons.append("attention_bias=True (moekit attention has no biases)")
    window = getattr(config, "sliding_window", None)
    if window is not None and (mt != "qwen2" or getattr(config, "use_sliding_window", False)) and (
            window < config.max_position_embeddings):
        reasons.append(f"sliding_window={window} (moekit attention is full causal)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        reasons.append(f"rope_type={rope.get('rope_type')!r} (moekit uses default RoPE)")
    if reasons:
        raise ValueError(f"cannot convert this transformers {mt} model: " + "; ".join(reasons))
    return LMConfig(
        vocab_size=config.vocab_size, dim=dim, n_layers=config.num_hidden_layers, n_heads=heads,
        n_kv_heads=config.num_key_value_heads, max_seq_len=config.max_position_embeddings,
        ffn_hidden=config.intermediate_size, activation=ACTIVATIONS[act],
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10_000.0))),
        norm_eps=config.rms_norm_eps, qk_norm=QK_NORM.get(mt, "none"),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        init_std=getattr(config, "initializer_range", 0.02), num_experts=0,
    )


def from_hf_dense(hf: Any) -> MoELM:
    """A moekit dense MoELM with the weights of a transformers Llama/Mistral/Qwen2/Qwen3 causal LM (copied,
    float32 kept as the source's dtype). Qwen2's q/k/v biases must be zero (moekit attention has none)."""
    cfg = lm_config_from_hf(hf.config)
    state = {}
    for key, t in hf.state_dict().items():
        k = key.removeprefix("model.")
        if k.endswith("_proj.bias") and ".self_attn." in k:
            if bool(t.any()):
                raise ValueError(
                    f"cannot convert this transformers {hf.config.model_type} model: {key} is not zero "
                    "(moekit attention has no biases)"
                )
            continue
        state[k] = t.detach().clone()
    model = MoELM(cfg).to(next(hf.parameters()).dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"transformers {hf.config.model_type} tensors do not map onto moekit's LM: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    return model.eval()


def load_hf_dense(path: str | Path) -> tuple[MoELM, str]:
    """(moekit dense LM, model_type) from a transformers checkpoint folder (offline; no code from the folder)."""
    transformers = require("transformers")
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    lm_config_from_hf(config)  # fails before the weights are read
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False, dtype=torch.float32
    )
    return from_hf_dense(hf), config.model_type
