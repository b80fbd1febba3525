"""Nexus: router rows are the projected domain embeddings; adding an expert keeps the old routing where it loses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moekit.convert.nexus import NexusConfig, add_expert, domain_embedding, nexus
from moekit.convert.prompts import ffn_inputs
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.convert.conftest import dense_lm

GEN = torch.Generator().manual_seed(0)
DOMAINS = [torch.randint(lo, lo + 16, (4, 16), generator=GEN) for lo in (0, 16, 32, 48)]  # 4 "domains" of token ids


def built(k: int = 1):
    seed = dense_lm(seed=10)
    branches = [dense_lm(seed=s) for s in (11, 12, 13)]
    d = torch.stack([domain_embedding(seed, [DOMAINS[i]]) for i in range(3)])
    return seed, branches, d, nexus(branches, d, seed_model=seed, cfg=NexusConfig(k=k)).eval()


def test_domain_embedding_is_the_mean_final_hidden_state():
    m = dense_lm(seed=10)
    states = []
    h = m.norm.register_forward_hook(lambda _m, _i, o: states.append(o))
    m(DOMAINS[0][:2])
    m(DOMAINS[0][2:])
    h.remove()
    want = torch.cat([s.reshape(-1, 32) for s in states]).mean(0)
    torch.testing.assert_close(domain_embedding(m, [DOMAINS[0][:2], DOMAINS[0][2:]]), want)


def test_nexus_model_routes_by_projected_domain_embeddings():
    seed, branches, d, moe = built(k=2)
    mlp = moe.layers[1].mlp
    assert moe.config.router == "nexus" and moe.config.num_experts == 3 and moe.config.num_shared_experts == 1
    assert torch.equal(mlp.router.domain_embeddings, d)
    assert torch.equal(mlp.shared_experts.up_proj.weight, seed.layers[1].mlp.up_proj.weight)
    assert torch.equal(mlp.experts.down_proj[1], branches[1].layers[1].mlp.down_proj.weight)
    r = mlp.router
    rows = F.silu(d @ r.proj_gate.weight.T) * (d @ r.proj_up.weight.T) @ r.proj_out.weight.T  # [E, D] by hand
    x = torch.randn(10, 32)
    torch.testing.assert_close(r(x).logits, x @ rows.T, atol=1e-5, rtol=1e-5)
    out = moe.train()(DOMAINS[0], targets=DOMAINS[0])
    (out.loss + out.aux_loss).backward()
    assert r.proj_gate.weight.grad.abs().sum() > 0 and r.domain_embeddings.grad is None  # buffer: not trained


def test_adding_an_expert_keeps_old_routing_where_the_new_one_loses(tmp_path):
    seed, branches, d, moe = built(k=1)
    old = copy.deepcopy(moe)
    new_branch = dense_lm(seed=14)
    e = add_expert(moe, new_branch, domain_embedding(seed, [DOMAINS[3]]))
    assert e == 3 and moe.config.num_experts == 4
    assert torch.equal(moe.layers[0].mlp.experts.gate_up_proj[3, :48], new_branch.layers[0].mlp.gate_proj.weight)
    kept, won = 0, 0
    for dom in DOMAINS[:3]:  # in-domain tokens of the old experts, each block's FFN input of the old model
        for seq in dom:
            for i, h in enumerate(ffn_inputs(old, seq)):
                a, b = old.layers[i].mlp.router(h), moe.layers[i].mlp.router(h)
                torch.testing.assert_close(b.logits[:, :3], a.logits)  # the old experts' scores are unchanged
                lose = (b.expert_ids != 3).all(1)
                assert torch.equal(b.expert_ids[lose], a.expert_ids[lose])
                assert torch.equal(b.weights[lose], a.weights[lose])
                kept, won = kept + int(lose.sum()), won + int((~lose).sum())
    assert kept > 0 and won > 0, (kept, won)  # both cases happen, so the check above is not vacuous
    # whole sequences that never pick the new expert give the old logits exactly
    with torch.no_grad():
        for seq in torch.cat(DOMAINS[:3]):
            out = moe(seq[None])
            if all((r.expert_ids != 3).all() for r in out.routings):
                torch.testing.assert_close(out.logits, old(seq[None]).logits, atol=1e-6, rtol=0)
    save_checkpoint(tmp_path / "m", moe, {})
    back = load_model(tmp_path / "m")
    x = torch.cat(DOMAINS)[:, :8]
    torch.testing.assert_close(back(x).logits, moe(x).logits)


def test_bad_input_is_a_clear_error():
    seed, branches, d, moe = built()
    with pytest.raises(ValueError, match=r"domain_embeddings must be \[E=3, H\] .*got \(2, 32\)"):
        nexus(branches, d[:2], seed_model=seed)
    with pytest.raises(ValueError, match="shared_seed needs the seed model"):
        nexus(branches, d)
    with pytest.raises(ValueError, match=r"NexusConfig.k must be in \[1, number of experts=3\]"):
        nexus(branches, d, seed_model=seed, cfg=NexusConfig(k=4))
    with pytest.raises(ValueError, match=r"domain_embedding must be a finite \[32\] vector"):
        add_expert(moe, dense_lm(), torch.zeros(7))
    with pytest.raises(ValueError, match="dense with dim 32 and ffn_hidden 48"):
        add_expert(moe, dense_lm(ffn_hidden=64), torch.zeros(32))
    assert moe.config.num_experts == 3 and moe.layers[0].mlp.router.num_experts == 3  # nothing changed
    with pytest.raises(ValueError, match="router is 'topk', expected 'nexus'"):
        from moekit.convert import UpcycleConfig, upcycle

        add_expert(upcycle(dense_lm(), UpcycleConfig(num_experts=2, k=1)), dense_lm(), torch.zeros(32))
