"""MoEfication: balanced clustering, an exact split of the FFN, a trained router, bad input."""

from __future__ import annotations

import pytest
import torch

from moekit.convert import SplitConfig, balanced_kmeans, split, split_ffn
from moekit.convert.cluster import balanced_assign
from moekit.convert.split import flatten_weights
from moekit.layers import MLP, Experts
from moekit.routing import Routing
from tests.convert.conftest import dense_lm

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
BATCHES = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_balanced_assign_by_hand():
    # points 0, 1, 2 all prefer cluster 0, which has room for two: pairs by distance are (1,0) 0.5, (2,0) 0.8,
    # then (0,0) 1.0 finds cluster 0 full; (3,1) 3.0 and (0,1) 5.0 fill cluster 1
    dist = torch.tensor([[1.0, 5.0], [0.5, 9.0], [0.8, 2.0], [8.0, 3.0]])
    assert balanced_assign(dist, 2).tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="do not fill"):
        balanced_assign(dist, 3)


def test_balanced_kmeans_gives_equal_clusters_and_finds_planted_ones():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 5, generator=g) * 10
    pts = centres.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 5, generator=g)
    perm = torch.randperm(24, generator=g)
    labels = balanced_kmeans(pts[perm], 4, seed=2)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    truth = torch.arange(4).repeat_interleave(6)[perm]
    for c in range(4):  # every found cluster is one planted cluster
        assert truth[labels == c].unique().numel() == 1
    skewed = torch.cat([torch.zeros(20, 2), torch.ones(4, 2)]) + 0.01 * torch.randn(24, 2, generator=g)
    assert torch.bincount(balanced_kmeans(skewed, 3)).tolist() == [8, 8, 8]  # equal even when the data is not
    with pytest.raises(ValueError, match="must be a positive integer dividing the 24 points"):
        balanced_kmeans(pts, 5)


def test_split_ffn_with_all_experts_and_weights_one_equals_the_dense_ffn():
    torch.manual_seed(0)
    mlp = MLP(dim=16, hidden=24)
    labels = torch.randperm(24) % 4
    gate_up, down = split_ffn(mlp, labels, 4)
    experts = Experts(num_experts=4, dim=16, hidden=6)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    x = torch.randn(10, 16)
    ids = torch.arange(4).expand(10, 4)
    y = experts(x, Routing(ids, torch.ones(10, 4), torch.zeros(10, 4), 4))
    torch.testing.assert_close(y, mlp(x), atol=1e-6, rtol=0)
    # slow reference: expert e is the dense FFN restricted to the neurons labelled e
    h = mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)
    e2 = (h * (labels == 2)) @ mlp.down_proj.weight.T
    y2 = experts(x, Routing(torch.full((10, 1), 2), torch.ones(10, 1), torch.zeros(10, 4), 4))
    torch.testing.assert_close(y2, e2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must put 6 neurons in each of 4 experts"):
        split_ffn(mlp, torch.zeros(24, dtype=torch.long), 4)


@pytest.mark.parametrize("cluster", ["weights", "activations"])
def test_split_lm_with_every_expert_active_equals_dense(cluster):
    dense = dense_lm()
    moe, report = split(dense, SplitConfig(num_experts=4, k=4, cluster=cluster, router_steps=0), BATCHES)
    torch.testing.assert_close(moe.eval()(IDS).logits, dense(IDS).logits, atol=1e-5, rtol=0)
    assert all(sorted(torch.bincount(torch.tensor(c)).tolist()) == [12] * 4 for c in report.clusters.values())


def test_trained_router_predicts_the_largest_experts_with_weights_near_one():
    dense = dense_lm()
    cfg = SplitConfig(num_experts=4, k=1, router_steps=40, router_lr=0.05)
    moe, report = split(dense, cfg, BATCHES)
    assert all(r > 0.4 for r in report.router_recall.values()), report.router_recall  # chance: k/E = 0.25
    for b, r in report.router_recall.items():  # and better than always guessing the most frequent expert
        assert r > report.constant_recall[b] >= 0.25, (report.router_recall, report.constant_recall)
    r = moe.layers[0].mlp.router(torch.randn(8, 32))
    torch.testing.assert_close(r.weights, torch.ones(8, 1))  # k=1: renormalised weight 1, routed_scale 1
    w = torch.randn(4, 32)
    x = torch.randn(50, 32)
    flat = flatten_weights(w, x, 2, 0.05)
    assert torch.equal((x @ flat.T).topk(2).indices, (x @ w.T).topk(2).indices)  # same choices
    p = torch.softmax(x @ flat.T, 1).topk(2).values
    assert float((p / p.sum(1, keepdim=True) * 2 - 1).abs().max()) <= 0.05


def test_split_bad_input_is_a_clear_error():
    dense = dense_lm()
    with pytest.raises(ValueError, match="num_experts=5 must divide the dense FFN width ffn_hidden=48"):
        split(dense, SplitConfig(num_experts=5, k=1, cluster="weights", router_steps=0))
    with pytest.raises(ValueError, match="cluster='activations' needs calibration data"):
        split(dense, SplitConfig(num_experts=4, k=1))
    with pytest.raises(ValueError, match=r"SplitConfig.cluster must be one of \['activations', 'weights'\]"):
        SplitConfig(cluster="graph")
    ungated = dense_lm()
    ungated.layers[0].mlp = MLP(dim=32, hidden=48, gated=False)
    with pytest.raises(ValueError, match="not gated"):
        split(ungated, SplitConfig(num_experts=4, cluster="weights"))
