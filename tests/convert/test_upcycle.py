"""Sparse upcycling: the upcycled MoE equals the dense model at the start; options and bad input."""

from __future__ import annotations

import pytest
import torch

from moekit.convert import UpcycleConfig, upcycle
from moekit.convert.upcycle import expert_weights
from moekit.layers import MLP
from tests.convert.conftest import dense_lm

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("router_std", [0.0, 0.02, 1.0])
def test_identical_experts_give_the_dense_logits(router_std):
    dense = dense_lm()
    moe = upcycle(dense, UpcycleConfig(num_experts=4, k=2, router_std=router_std)).eval()
    assert moe.config.num_experts == 4 and moe.config.expert_hidden == 48
    out = moe(IDS)
    torch.testing.assert_close(out.logits, dense(IDS).logits, atol=1e-5, rtol=0)
    # every MoE layer really routed: two experts per token, weights summing to one
    for r in out.routings:
        assert r.expert_ids.shape == (32, 2)
        torch.testing.assert_close(r.weights.sum(1), torch.ones(32))
    assert float(moe.layers[0].mlp.router.weight.detach().std()) == pytest.approx(router_std, rel=0.2, abs=1e-12)


@pytest.mark.parametrize("G,k", [(2, 1), (4, 2)])
def test_granular_upcycling_equals_dense_at_init(G, k):
    dense = dense_lm(seed=3)
    moe = upcycle(dense, UpcycleConfig(num_experts=4, k=k, granularity=G, router_std=0.5)).eval()
    assert moe.config.num_experts == 4 * G and moe.config.expert_hidden == 48 // G
    assert moe.config.router_args["k"] == k * G and moe.config.router_args["routed_scale"] == G
    out = moe(IDS)
    torch.testing.assert_close(out.logits, dense(IDS).logits, atol=1e-5, rtol=0)
    ids = out.routings[0].expert_ids  # whole copies are chosen: each picked copy contributes all its G slices
    copies = ids // G
    assert all(sorted(torch.bincount(row, minlength=4).tolist())[-k:] == [G] * k for row in copies)


def test_expert_slices_match_the_dense_neurons():
    mlp = MLP(dim=8, hidden=12)
    gate_up, down = expert_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 3)
    assert gate_up.shape == (3, 8, 8) and down.shape == (3, 8, 4)
    torch.testing.assert_close(gate_up[1, :4], mlp.gate_proj.weight[4:8])  # slice 1: neurons 4..7, gate rows
    torch.testing.assert_close(gate_up[1, 4:], mlp.up_proj.weight[4:8])
    torch.testing.assert_close(down[2], mlp.down_proj.weight[:, 8:12])


def test_gradients_reach_routers_and_experts():
    moe = upcycle(dense_lm(), UpcycleConfig(num_experts=4, k=2)).train()
    out = moe(IDS, targets=IDS)
    (out.loss + out.aux_loss).backward()
    mlp = moe.layers[1].mlp
    assert mlp.router.weight.grad.abs().sum() > 0 and mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert {"load_balance", "z_loss"} <= set(out.routings[0].aux)


def test_noise_and_reinit_break_symmetry_by_the_requested_amount():
    dense = dense_lm()
    noisy = upcycle(dense, UpcycleConfig(num_experts=4, k=2, noise=0.1, seed=1))
    w = noisy.layers[0].mlp.experts.gate_up_proj.detach()
    src = torch.cat([dense.layers[0].mlp.gate_proj.weight, dense.layers[0].mlp.up_proj.weight]).detach()
    rel = (w - src).std() / src.std()
    assert 0.08 < float(rel) < 0.12 and not torch.equal(w[0], w[1])
    re = upcycle(dense, UpcycleConfig(num_experts=4, k=2, reinit=0.25, seed=1))
    w = re.layers[0].mlp.experts.gate_up_proj.detach()  # [4, 96, 32]: 12 of 48 neurons redrawn per expert
    changed = (w[:, :48] != src[:48]).any(-1)  # [4, 48] gate rows
    assert changed.sum(1).tolist() == [12, 12, 12, 12]
    assert torch.equal(changed, (w[:, 48:] != src[48:]).any(-1))  # the same neurons' up rows
    down = re.layers[0].mlp.experts.down_proj.detach()
    assert torch.equal(changed, (down != dense.layers[0].mlp.down_proj.weight.detach()).any(1))


def test_dense_blocks_are_kept_and_copied():
    dense = dense_lm(n_layers=3)
    moe = upcycle(dense, UpcycleConfig(num_experts=2, k=1, first_k_dense=1)).eval()
    assert [moe.config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert torch.equal(moe.layers[0].mlp.down_proj.weight, dense.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(moe(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=0)


def test_bad_input_is_a_clear_error():
    dense = dense_lm()
    with pytest.raises(ValueError, match="granularity=5 must divide the dense FFN width ffn_hidden=48"):
        upcycle(dense, UpcycleConfig(num_experts=2, granularity=5))
    with pytest.raises(ValueError, match=r"UpcycleConfig.k must be in \[1, num_experts=2\]"):
        UpcycleConfig(num_experts=2, k=3)
    with pytest.raises(ValueError, match="router_std must be > 0 when granularity > 1"):
        UpcycleConfig(granularity=2, router_std=0)
    with pytest.raises(ValueError, match=r"reinit must be in \[0, 1\)"):
        UpcycleConfig(reinit=1.0)
    moe = upcycle(dense, UpcycleConfig(num_experts=2, k=1))
    with pytest.raises(ValueError, match="already has experts"):
        upcycle(moe)
    ungated = dense_lm()
    ungated.layers[1].mlp = MLP(dim=32, hidden=48, gated=False)
    with pytest.raises(ValueError, match="block 1's feed-forward is not gated"):
        upcycle(ungated)
