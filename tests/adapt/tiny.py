"""Tiny models for the adapt tests: a transformers Llama built from a config, and moekit's dense LM."""

from __future__ import annotations

import torch
from torch import nn

from moekit.models import MoELM
from tests.helpers import tiny_lm


def tiny_llama(seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_moekit(seed: int = 0) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(tiny_lm()).eval()


def randomize_b(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Give every adapter's B nonzero values, so the adapters change the output."""
    from moekit.adapt import adapted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for name, p in layer.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
