"""The LM: shapes, gradients, a hand-built dense reference, KV cache, parameter counts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.models import LMConfig, MoELM, count_params
from tests.helpers import TINY_LM

TINY = TINY_LM


def tiny(**kw) -> MoELM:
    return MoELM(LMConfig(**{**TINY, **kw}))


def test_forward_backward_shapes_dense_and_moe():
    for model in (tiny(), tiny(num_experts=4, expert_hidden=16, router_args={"k": 2})):
        ids = torch.randint(0, 64, (3, 10))
        out = model(ids, targets=ids)
        assert out.logits.shape == (3, 10, 64)
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        assert all(p.grad is not None for p in model.parameters())
    assert out.aux_loss is not None and len([r for r in out.routings if r is not None]) == 2


def reference_forward(model: MoELM, ids: torch.Tensor) -> torch.Tensor:
    """The dense LM written out by hand: embeddings, RMSNorm, RoPE attention, SwiGLU, tied head."""
    cfg = model.config
    x = model.embed_tokens.weight[ids]  # [B, L, D]
    B, L, D = x.shape
    hd = cfg.head_dim
    pos = torch.arange(L, dtype=torch.float32)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[:, None] * inv[None]  # [L, hd/2]

    def rope(t):  # t [B, H, L, hd], rotate pairs (i, i + hd/2)
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        c, s = ang.cos(), ang.sin()
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for blk in model.layers:
        h = rms(x, blk.input_layernorm.weight)
        at = blk.self_attn
        q = (h @ at.q_proj.weight.t()).view(B, L, cfg.n_heads, hd).transpose(1, 2)
        k = (h @ at.k_proj.weight.t()).view(B, L, cfg.n_kv_heads, hd).transpose(1, 2)
        v = (h @ at.v_proj.weight.t()).view(B, L, cfg.n_kv_heads, hd).transpose(1, 2)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        x = x + o @ at.o_proj.weight.t()
        h = rms(x, blk.post_attention_layernorm.weight)
        m = blk.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.t()) * (h @ m.up_proj.weight.t())) @ m.down_proj.weight.t()
    return rms(x, model.norm.weight) @ model.embed_tokens.weight.t()


def test_dense_lm_equals_hand_built_reference():
    model = tiny().eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference_forward(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, dict(num_experts=4, expert_hidden=16, num_shared_experts=1, shared_gate=True)])
def test_kv_cache_matches_full_forward(kw):
    model = tiny(**kw).eval()
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids).logits
    cache = model.new_cache(2)
    a = model(ids[:, :7], cache=cache).logits
    b = model(ids[:, 7:8], cache=cache).logits
    c = model(ids[:, 8:], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_argmax_loop():
    model = tiny(num_experts=4, expert_hidden=16).eval()
    prompt = torch.randint(0, 64, (1, 5))
    out = model.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_seeded_and_top_p_restricts():
    model = tiny().eval()
    prompt = torch.randint(0, 64, (2, 3))
    a = model.generate(prompt, 5, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 5, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    from moekit.models.lm import sample_next

    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    draws = {int(sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {0}  # p(0) = 0.73 >= 0.5: the nucleus holds token 0 only


def test_param_counts_match_the_module():
    for kw in (
        {},
        dict(num_experts=4, expert_hidden=16, num_shared_experts=2, shared_gate=True, first_k_dense=1),
        dict(num_experts=4, router="null_experts", router_args={"k": 2, "num_null": 2}),
    ):
        cfg = LMConfig(**{**TINY, **kw})
        model = MoELM(cfg)
        pc = count_params(cfg)
        assert pc.total == sum(p.numel() for p in model.parameters())
        if cfg.num_experts:
            assert pc.active < pc.total
            assert pc.experts_active * cfg.num_experts == pc.experts_total * 2  # k = 2 of E experts


def test_moe_and_dense_presets_have_equal_active_params():
    dense = LMConfig(**{**TINY, "ffn_hidden": 32})
    moe = LMConfig(**{**TINY, "num_experts": 8, "expert_hidden": 16, "router_args": {"k": 2}})
    d, m = count_params(dense), count_params(moe)
    assert m.active - d.active == 2 * TINY["dim"] * 8  # only the routers differ
    assert m.total > 3 * d.total // 2


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LMConfig(**{**TINY, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="unknown fields .*'colour'"):
        LMConfig.from_dict({**TINY, "colour": "blue"})
    with pytest.raises(KeyError, match="known routers"):
        LMConfig(**{**TINY, "num_experts": 4, "router": "nope"})
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model(torch.full((1, 3), 64))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        model(torch.zeros(3, dtype=torch.long))


def test_count_params_uses_measured_experts_per_token():
    from moekit.models import count_params

    base = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, num_experts=8,
                expert_hidden=8)
    topk = count_params(LMConfig(**base, router_args={"k": 2}))
    per_expert = topk.experts_total // 8
    assert topk.experts_active == 2 * per_expert and not topk.variable_k and not topk.measured
    topp = count_params(LMConfig(**base, router="topp", router_args={"p": 0.5}))
    assert topp.variable_k and topp.experts_active == topp.experts_total  # unmeasured: the bound, every expert
    topp3 = count_params(LMConfig(**base, router="topp", router_args={"p": 0.5, "max_k": 3}))
    assert topp3.experts_active == 3 * per_expert
    m = count_params(LMConfig(**base, router="topp", router_args={"p": 0.5}), experts_per_token=1.5)
    assert m.measured and m.experts_active == int(topp.experts_total * 1.5 / 8)
    assert m.active - m.experts_active == topp.active - topp.experts_active
