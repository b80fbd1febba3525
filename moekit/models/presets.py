"""Named model configs. `tiny-dense` and `tiny-moe` have the same active parameters per token
(the MoE's k=2 experts of width F equal the dense FFN of width 2F; only the router adds D*E)."""

from __future__ import annotations

from moekit.models.config import LMConfig

_BASE = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128)

PRESETS: dict[str, dict] = {
    # seconds on a CPU: for tests and smoke runs
    "micro-dense": dict(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32, ffn_hidden=64),
    "micro-moe": dict(
        vocab_size=512,
        dim=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        max_seq_len=32,
        num_experts=4,
        expert_hidden=32,
        router_args={"k": 2},
    ),
    # minutes on 2 CPU cores: the quickstart pair
    "tiny-dense": dict(**_BASE, ffn_hidden=512),
    "tiny-moe": dict(**_BASE, num_experts=8, expert_hidden=256, router="topk", router_args={"k": 2}),
}


def preset(name: str, **overrides) -> LMConfig:
    """The preset `name` with fields overridden; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return LMConfig(**{**PRESETS[name], **overrides})
