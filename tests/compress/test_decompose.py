"""Expert decomposition: shared base + low-rank deltas (`LowRankExperts`), against the plain experts it came
from, the mean expert, hand-allocated rank budgets and a checkpoint round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.compress.decompose import allocate_ranks, decompose, decompose_experts, lowrank_params
from moekit.layers.experts import Experts
from moekit.layers.lowrank import LowRankExperts, max_rank
from moekit.models import MoELM
from moekit.routing.routing import Routing
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.helpers import tiny_lm

D, F_, E = 16, 8, 4


def routing(T=10, k=2, seed=0):
    """Random top-k routing over E experts with one empty slot (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 1] = -1
    w = torch.rand(T, k, generator=g)
    w[0, 1] = 0.0
    return Routing(ids, w, torch.zeros(T, E), E)


@pytest.mark.parametrize("gated", [True, False])
def test_full_rank_equals_the_original_layer_with_gradients(gated):
    torch.manual_seed(0)
    ex = Experts(num_experts=E, dim=D, hidden=F_, gated=gated)
    low = decompose_experts(ex, max_rank(D, F_, gated))
    x = torch.randn(10, D, requires_grad=True)
    r = routing()
    want = ex(x, r)
    got = low(x, r)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    gw, = torch.autograd.grad(want.square().sum(), x)
    gg, = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(gg, gw, atol=1e-5, rtol=0)


def test_rank_zero_is_the_mean_expert_and_forward_matches_materialize():
    torch.manual_seed(0)
    ex = Experts(num_experts=E, dim=D, hidden=F_)
    mean = copy.deepcopy(ex)
    with torch.no_grad():
        for p in mean.parameters():
            p.copy_(p.mean(0, keepdim=True).expand_as(p))
    x, r = torch.randn(10, D), routing()
    torch.testing.assert_close(decompose_experts(ex, 0)(x, r), mean(x, r), atol=1e-5, rtol=0)
    low = decompose_experts(ex, 3)
    assert low.gate_up_u.shape == (E, 2 * F_, 3) and low.down_v.shape == (E, 3, F_)
    dense = low.materialize()
    assert type(dense) is Experts and dense.gate_up_proj.shape == ex.gate_up_proj.shape
    x.requires_grad_(True)
    got, want = low(x, r), dense(x, r)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the rank-3 delta is the best rank-3 approximation of each expert's difference from the mean
    delta = ex.down_proj.detach().double() - ex.down_proj.detach().double().mean(0)
    s = torch.linalg.svdvals(delta)
    err = (dense.down_proj.double() - ex.down_proj.double()).square().sum((1, 2))
    torch.testing.assert_close(err, s[:, 3:].square().sum(1))


def test_rank_allocation_by_hand():
    # block 0's deltas have squared singular values 16, 9, 1; block 1's 4, 4, 0 (one expert, one projection)
    spectra = {0: {"m": torch.tensor([[4.0, 3.0, 1.0]])}, 1: {"m": torch.tensor([[2.0, 2.0, 0.0]])}}
    shapes = {0: {"m": (3, 3)}, 1: {"m": (3, 3)}}
    counts = {0: 1, 1: 1}
    assert lowrank_params(1, shapes[0], 2) == 9 + 2 * 6
    base = 18  # the bases alone; each rank costs 6
    # greedy by gain per parameter: 16 (block 0), 9 (block 0), 4 (block 1), 4 (block 1), 1 (block 0), 0: never
    assert allocate_ranks(spectra, shapes, counts, base + 6 * 1) == {0: 1, 1: 0}
    assert allocate_ranks(spectra, shapes, counts, base + 6 * 3) == {0: 2, 1: 1}
    assert allocate_ranks(spectra, shapes, counts, base + 6 * 5 + 5) == {0: 3, 1: 2}
    assert allocate_ranks(spectra, shapes, counts, base + 6 * 100) == {0: 3, 1: 2}  # rank 3 of block 1 removes 0
    with pytest.raises(ValueError, match="bases alone"):
        allocate_ranks(spectra, shapes, counts, base - 1)


@torch.no_grad()
def test_decomposed_model_round_trips_with_per_block_ranks(tmp_path):
    torch.manual_seed(0)
    m = MoELM(tiny_lm(num_experts=4, expert_hidden=8, router_args={"k": 2})).eval()
    ex1 = m.layers[1].mlp.experts
    for p in ex1.parameters():
        p.copy_(p[:1].expand_as(p))  # block 1: identical experts, nothing to keep beyond the base
    ids = torch.randint(0, 64, (2, 10))
    before = m(ids).logits
    r = decompose(m, ratio=0.5)
    assert r.ranks[1] == 0 and r.ranks[0] > 0 and r.error[1] < 1e-6
    assert r.params[1] <= 0.5 * r.params[0]
    assert m.config.experts == "lowrank" and m.config.experts_args["rank"] == {"0": r.ranks[0], "1": 0}
    assert isinstance(m.layers[0].mlp.experts, LowRankExperts)
    after = m(ids).logits
    save_checkpoint(tmp_path / "run", m, {"step": 0})
    back = load_model(tmp_path / "run")
    assert back.layers[0].mlp.experts.rank == r.ranks[0] and back.layers[1].mlp.experts.rank == 0
    torch.testing.assert_close(back(ids).logits, after)
    m2 = copy.deepcopy(back)
    for block in m2.layers:
        block.mlp.experts = block.mlp.experts.materialize()
    torch.testing.assert_close(m2(ids).logits, after, atol=1e-5, rtol=0)
    assert not torch.allclose(after, before, atol=1e-4)  # rank < full: block 0 changed


@torch.no_grad()
def test_bad_input_changes_nothing():
    torch.manual_seed(0)
    m = MoELM(tiny_lm(num_experts=4, expert_hidden=8, router_args={"k": 2}))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    top = max_rank(32, 8)
    for kw, msg in [(dict(rank=-1), "rank"), (dict(rank=top + 1), "rank"), (dict(ratio=0.0), "ratio"),
                    (dict(ratio=1.0), "ratio"), (dict(ratio=0.99), "bases alone"), (dict(), "exactly one"),
                    (dict(rank=2, ratio=0.5), "exactly one")]:
        with pytest.raises(ValueError, match=msg):
            decompose(m, **kw)
    assert m.config.experts == "ffn"
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="dense"):
        decompose(MoELM(tiny_lm()), rank=1)
    with pytest.raises(ValueError, match="rank must be an integer in"):
        LowRankExperts(num_experts=2, dim=8, hidden=4, rank=9)
    with pytest.raises(ValueError, match="per block"):
        LowRankExperts(num_experts=2, dim=8, hidden=4, rank={"0": 1}, layer=1)


def test_flops_per_token_by_hand():
    low = LowRankExperts(num_experts=2, dim=8, hidden=12, rank=3)
    load, T = torch.tensor([6.0, 4.0]), 10
    base = 2 * (24 * 8 + 8 * 12)  # the two base projections, once per token
    per_slot = 2 * (3 * (24 + 8) + 3 * (8 + 12))  # both rank-3 deltas
    assert low.flops_per_token(load, T) == pytest.approx(base + per_slot * 10 / T)


@torch.no_grad()
def test_keep_experts_on_lowrank_experts_equals_keep_on_the_dense_ones():
    from moekit.layers import MoE, keep_experts
    from moekit.routing import build_router

    torch.manual_seed(0)
    moe = MoE(router=build_router("topk", dim=D, num_experts=E, k=2),
              experts=decompose_experts(Experts(num_experts=E, dim=D, hidden=F_), 2)).eval()
    dense = copy.deepcopy(moe)
    dense.experts = moe.experts.materialize()
    keep_experts(moe, [3, 0, 2])
    keep_experts(dense, [3, 0, 2])
    assert moe.experts.num_experts == 3 and moe.experts.gate_up_base.shape == (2 * F_, D)
    x = torch.randn(7, D)
    torch.testing.assert_close(moe(x)[0], dense(x)[0], atol=1e-5, rtol=0)
