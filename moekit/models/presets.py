"""Named model configs. `tiny-dense` and `tiny-moe` have the same active parameters per token
(the MoE's k=2 experts of width F equal the dense FFN of width 2F; only the router adds D*E)."""

from __future__ import annotations

from moekit.models.config import LMConfig

_BASE = dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128)
_REF_BODY = dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)

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
    # the two routed weights sum to 2 (routed_scale): the MoE's FFN output starts at the dense model's scale, not
    # half of it; load balance 0.001 per layer, as in transformers' Mixtral/Qwen3-MoE (issue 13's measurements)
    "tiny-moe": dict(**_BASE, num_experts=8, expert_hidden=256, router="topk",
                     router_args={"k": 2, "routed_scale": 2.0, "load_balance": 0.001}),
    # the reference models (`moekit ref build`, moekit.ref): vocab_size comes from the data. The MoEs' routed
    # weights sum to k (routed_scale=k), so MoE and dense start at the same FFN output scale; the balance
    # coefficient is per layer, comparable to transformers' Mixtral/Qwen3 default (0.001). `ffn_out_mult` is each
    # model's best from the sweep (benchmarks/ref_sweep.py, benchmarks/results/tune/); ref-dense-4x takes
    # ref-dense's (not swept itself: its runs cost 4x).
    "ref-dense": dict(**_REF_BODY, ffn_hidden=1024, ffn_out_mult=4.0),  # the MoEs' active FFN width
    "ref-dense-4x": dict(**_REF_BODY, ffn_hidden=4096, ffn_out_mult=4.0),  # ref-moe's total FFN parameters
    "ref-moe": dict(
        **_REF_BODY, num_experts=8, expert_hidden=512, router="topk", ffn_out_mult=8.0,
        router_args={"k": 2, "routed_scale": 2.0, "load_balance": 0.001},
    ),
    # fine-grained with shared experts: active FFN width 6 x 128 routed + 2 x 128 shared = 1024; ref-moe's
    # ffn_out_mult and learning rate (not swept itself)
    "ref-moe-fg": dict(
        **_REF_BODY, num_experts=32, expert_hidden=128, num_shared_experts=2, router="topk", ffn_out_mult=8.0,
        router_args={"k": 6, "routed_scale": 6.0, "load_balance": 0.001},
    ),
}


def preset(name: str, **overrides) -> LMConfig:
    """The preset `name` with fields overridden; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return LMConfig(**{**PRESETS[name], **overrides})
