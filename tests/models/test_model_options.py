"""LM options of the router zoo: Chain-of-Experts (moe_iterations) and WideNet (share_blocks)."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import MoE
from moekit.models import LMConfig, MoELM
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.helpers import TINY_LM

TINY = dict(TINY_LM, n_layers=3, max_seq_len=16, num_experts=4, expert_hidden=16, router_args={"k": 1})


def test_chain_of_experts_lm():
    cfg = LMConfig(**TINY, moe_iterations=2)
    model = MoELM(cfg)
    assert all(isinstance(b.mlp, MoE) and b.mlp.iterations == 2 for b in model.layers)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, targets=ids)
    assert all(r.expert_ids.shape == (16, 2) for r in out.routings)  # 2 iterations x top-1
    (out.loss + out.aux_loss).backward()
    assert model.layers[0].mlp.routers[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="moe_iterations"):
        LMConfig(**TINY, moe_iterations=0)


def test_widenet_shares_attention_and_moe_but_not_norms(tmp_path):
    torch.manual_seed(0)
    model = MoELM(LMConfig(**TINY, share_blocks=True))
    plain = MoELM(LMConfig(**TINY))
    b0 = model.layers[0]
    assert all(b.self_attn is b0.self_attn and b.mlp is b0.mlp for b in model.layers)
    assert len({id(b.input_layernorm) for b in model.layers}) == 3
    keys = model.state_dict().keys()
    assert not any(k.startswith(("layers.1.self_attn", "layers.2.mlp")) for k in keys)
    assert "layers.2.input_layernorm.weight" in keys
    n_shared = sum(p.numel() for p in model.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    per_block = sum(p.numel() for p in plain.layers[1].self_attn.parameters()) + sum(
        p.numel() for p in plain.layers[1].mlp.parameters())
    assert n_plain - n_shared == 2 * per_block
    with torch.no_grad():
        for i, b in enumerate(model.layers):  # distinct norms, so the blocks differ
            b.input_layernorm.weight.fill_(1.0 + 0.3 * i)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids)
    # by hand: the same attention and MoE in every block, each block's own norms
    x = model.embed_tokens(ids)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    for i, b in enumerate(model.layers):
        x = x + b0.self_attn(b.input_layernorm(x), cos, sin, None, i)
        x = x + b0.mlp(b.post_attention_layernorm(x), token_ids=ids)[0]
    torch.testing.assert_close(out.logits, model.lm_head(model.norm(x)))
    # checkpoints hold the shared tensors once and load back to identical outputs
    save_checkpoint(tmp_path, model, {"model": model.config.to_dict()})
    torch.testing.assert_close(load_model(tmp_path)(ids).logits, out.logits)
    # KV-cached decoding gives the full forward's logits
    model.eval()
    cache = model.new_cache(2)
    step = torch.cat([model(ids[:, :5], cache=cache).logits, model(ids[:, 5:], cache=cache).logits], dim=1)
    torch.testing.assert_close(step, model(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="share_blocks"):
        LMConfig(**TINY, share_blocks=True, first_k_dense=1)
