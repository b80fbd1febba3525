"""MC-SMoE merging: neuron alignment, grouping, frequency-weighted merging and the low-rank + sparse step,
checked against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.compress import calibrate
from moekit.compress.calibrate import LayerStats
from moekit.compress.mcsmoe import (
    align_permutation,
    expert_weights,
    group_experts,
    low_rank_sparse,
    mcsmoe,
    merge_layer,
    permute_expert,
)
from moekit.layers.experts import Experts
from moekit.layers.moe import MoE
from moekit.models import MoELM
from moekit.routing.registry import build_router
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.compress.test_prune import Toy
from tests.helpers import tiny_lm


@pytest.mark.parametrize("gated", [True, False])
def test_alignment_recovers_a_permuted_copy_exactly(gated):
    torch.manual_seed(0)
    ex = Experts(num_experts=2, dim=8, hidden=6, gated=gated)
    center = expert_weights(ex, 0)
    perm = torch.randperm(6)
    member = permute_expert(center, perm)  # a shuffled copy of expert 0
    assert not torch.equal(member["down_proj"], center["down_proj"])
    found = align_permutation(center, member)
    back = permute_expert(member, found)
    for name in center:
        assert torch.equal(back[name], center[name])
    # a permutation of hidden neurons keeps the expert's function
    x = torch.randn(5, 8)
    shuffled = copy.deepcopy(ex)
    with torch.no_grad():
        for name, w in member.items():
            getattr(shuffled, name)[0] = w
    ids = torch.zeros(5, 1, dtype=torch.long)
    from moekit.routing.routing import Routing

    r = Routing(ids, torch.ones(5, 1), torch.zeros(5, 2), 2)
    torch.testing.assert_close(shuffled(x, r), ex(x, r))


def _stats(counts, similarity):
    """LayerStats with `counts` and a logits gram whose cosine similarity is `similarity`."""
    E = len(counts)
    s = LayerStats(0, torch.tensor(counts), torch.zeros(E), torch.zeros(E), torch.zeros(E), torch.zeros(E))
    s.logits_gram = torch.tensor(similarity, dtype=torch.float64)
    return s


def test_grouping_by_hand():
    counts = torch.tensor([9, 1, 7, 2, 8, 3])  # dominant (3 groups): 0, 4, 2
    sim = torch.eye(6)
    sim[1, 4] = sim[4, 1] = 0.9
    sim[1, 0] = sim[0, 1] = 0.8  # 1 is closer to 4 than to 0
    sim[3, 0] = sim[0, 3] = 0.5
    sim[3, 2] = sim[2, 3] = 0.4
    sim[5, 4] = sim[4, 5] = 0.2
    sim[5, 2] = sim[2, 5] = 0.1
    assert group_experts(sim, counts, 3) == [[0, 3], [2], [4, 1, 5]]
    # a protected expert is dominant and stays alone: 1 and 5 then go to 4, 3 to 0
    assert group_experts(sim, counts, 3, protected=[2]) == [[0, 3], [2], [4, 1, 5]]
    assert group_experts(sim, counts, 3, protected=[4]) == [[0, 1, 3], [2, 5], [4]]
    assert group_experts(sim, counts, 6) == [[e] for e in range(6)]
    with pytest.raises(ValueError, match="num_groups"):
        group_experts(sim, counts, 0)


def _toy_planted(E=4, D=4, seed=0):
    """One MoE layer, top-1, one-hot inputs: token t's logits are column t of the router weight, so expert e's
    logit column over tokens is row e. Row 3 is a scaled row 0 plus a little (cosine 1 - eps), row 2 points
    near row 1."""
    torch.manual_seed(seed)
    router = build_router("topk", dim=D, num_experts=E, k=1)
    W = torch.tensor([[4.0, 3.0, 0.0, 0.0],
                      [0.0, 0.0, 4.0, 1.0],
                      [0.0, 0.5, 3.0, 2.5],
                      [2.0, 1.4, 0.1, 0.0]])
    with torch.no_grad():
        router.weight.copy_(W)
    return Toy(MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=3)), D), W


@torch.no_grad()
def test_calibration_logit_similarity_and_planted_grouping():
    m, W = _toy_planted()
    ids = torch.tensor([[0, 1, 2, 3, 0, 2, 2, 3]])
    cal = calibrate(m, [ids])
    s = cal.layers[0]
    L = W[:, ids[0]].t().double()  # [T, E] logits, slow reference
    ref = torch.nn.functional.cosine_similarity(L[:, :, None], L[:, None, :], dim=0)
    torch.testing.assert_close(s.logit_similarity(), ref)
    # top-1 routing: token 0 -> expert 0 (logits 4, 0, 0, 2), 1 -> 0 (3, 0, .5, 1.4), 2 -> 1, 3 -> 2
    assert s.counts.tolist() == [3, 3, 2, 0]
    # 2 groups: dominant 0 and 1; expert 2's logit column points near 1's, expert 3's near 0's
    assert float(ref[2, 1]) > float(ref[2, 0]) and float(ref[3, 0]) > float(ref[3, 1])
    assert group_experts(s.logit_similarity(), s.counts, 2) == [[0, 3], [1, 2]]
    # 3 groups: dominant 0, 1, 2; expert 3 joins 0
    assert group_experts(s.logit_similarity(), s.counts, 3) == [[0, 3], [1], [2]]


@torch.no_grad()
def test_merge_is_frequency_weighted_with_router_rows():
    m, W = _toy_planted()
    layer = m.layers[0].mlp
    stats = _stats([6, 5, 4, 2], [[1, 0, 0, 0.9], [0, 1, 0, 0], [0, 0, 1, 0], [0.9, 0, 0, 1]])
    old = {k: v.clone() for k, v in layer.state_dict().items()}
    groups, stored = merge_layer(layer, stats, 3, align=False)
    assert groups == [[0, 3], [1], [2]] and stored == 0
    w = torch.tensor([6.0, 2.0]) / 8
    for name in ("experts.gate_up_proj", "experts.down_proj", "router.weight"):
        want = w[0] * old[name][0] + w[1] * old[name][3]
        torch.testing.assert_close(layer.state_dict()[name][0], want)
        torch.testing.assert_close(layer.state_dict()[name][1:], old[name][1:3])
    assert layer.experts.num_experts == layer.router.num_experts == 3


@torch.no_grad()
def test_merging_an_identical_expert_changes_nothing_and_needs_alignment():
    m, W = _toy_planted()
    layer = m.layers[0].mlp
    ex = layer.experts
    perm = torch.tensor([2, 0, 1])
    for name, t in permute_expert(expert_weights(ex, 0), perm).items():
        getattr(ex, name)[3] = t  # expert 3: expert 0 with its neurons shuffled
    layer.router.weight[3] = layer.router.weight[0]  # and the same router row
    stats = _stats([6, 5, 4, 2], [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    x = torch.randn(12, 4)
    want, _ = layer(x)
    aligned = copy.deepcopy(layer)
    assert merge_layer(aligned, stats, 3)[0] == [[0, 3], [1], [2]]
    torch.testing.assert_close(aligned(x)[0], want, atol=1e-6, rtol=0)
    unaligned = copy.deepcopy(layer)
    merge_layer(unaligned, stats, 3, align=False)
    assert (unaligned(x)[0] - want).abs().max() > 1e-3  # averaging unmatched neurons is not the expert


def test_low_rank_sparse_by_hand():
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64)
    full, n = low_rank_sparse(w, 4, 1.0)
    torch.testing.assert_close(full, w)
    assert n == 4 * 10
    dense, n = low_rank_sparse(w, 0, 0.0)
    torch.testing.assert_close(dense, w)
    assert n == 24
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    low = (U[:, :1] * S[:1]) @ Vh[:1]
    only_low, n = low_rank_sparse(w, 1, 1.0)
    torch.testing.assert_close(only_low, low)
    assert n == 10
    mixed, n = low_rank_sparse(w, 1, 0.75)  # keep the 6 largest residual entries
    res = w - low
    keep = res.abs().flatten().topk(6).indices
    want = low.flatten().clone()
    want[keep] += res.flatten()[keep]
    torch.testing.assert_close(mixed, want.view(6, 4))
    assert n == 10 + 6


@torch.no_grad()
def test_mcsmoe_on_a_model_round_trips_and_errors_change_nothing(tmp_path):
    torch.manual_seed(0)
    m = MoELM(tiny_lm(num_experts=4, expert_hidden=8, router_args={"k": 2})).eval()
    cal = calibrate(m, [torch.randint(0, 64, (2, 16))])
    state = {k: v.clone() for k, v in m.state_dict().items()}
    bad = [(dict(ratio=1.5), "ratio"), (dict(ratio=0.75), "k=2"), (dict(ratio=0.25, rank=9), "rank"),
           (dict(ratio=0.25, rank=-1), "rank"), (dict(ratio=0.25, rank=2, sparsity=1.5), "sparsity")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mcsmoe(m, cal, **kw)
    no_logits = calibrate(m, [torch.randint(0, 64, (2, 16))], record=["frequency"])
    with pytest.raises(ValueError, match="logits"):
        mcsmoe(m, no_logits, ratio=0.25)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    r = mcsmoe(m, cal, ratio=0.25, rank=4, sparsity=0.5, protect_super_experts=False)
    assert m.config.num_experts == 3 and set(r.groups) == {0, 1}
    assert all(sorted(e for g in gs for e in g) == [0, 1, 2, 3] for gs in r.groups.values())
    # per merged expert: gate_up [16, 32] and down [32, 8] at rank 4, half of each residual kept
    assert r.compressed_params == 2 * 3 * (4 * (16 + 32) + 16 * 32 // 2 + 4 * (32 + 8) + 32 * 8 // 2)
    ids = torch.randint(0, 64, (2, 10))
    save_checkpoint(tmp_path / "run", m, {"step": 0})
    back = load_model(tmp_path / "run")
    assert back.config.num_experts == 3
    torch.testing.assert_close(back(ids).logits, m(ids).logits)
