"""Helpers shared by the tests: a tiny moekit LM config with overrides (CPU, milliseconds per forward)."""

from __future__ import annotations

from typing import Any

from moekit.models import LMConfig

# Width 32, 2 blocks, 4 query heads over 2 KV heads, vocabulary 64, up to 32 tokens, dense FFN width 48.
TINY_LM: dict[str, Any] = dict(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_hidden=48
)


def tiny_lm(**overrides: Any) -> LMConfig:
    """`LMConfig` of a tiny LM: `TINY_LM` with `overrides` (any LMConfig field, e.g. num_experts=4,
    expert_hidden=16, router_args={"k": 2} for an MoE model; dense without num_experts)."""
    return LMConfig(**{**TINY_LM, **overrides})
