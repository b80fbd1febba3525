"""MoEC: intra-cluster variance loss and cluster-level expert dropout (re-routing within the cluster)."""

import torch

from moekit.routing import build_router
from moekit.routing.moec import cluster_variance_loss


def test_variance_loss_zero_iff_clusters_are_flat():
    flat = torch.tensor([[0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]])
    assert float(cluster_variance_loss(flat, 2)) == 0.0
    bumpy = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]])
    assert float(cluster_variance_loss(bumpy, 2)) > 0
    assert float(cluster_variance_loss(bumpy, 1)) == 0.0


def test_dropped_experts_are_replaced_within_their_cluster():
    torch.manual_seed(0)
    E, S, T = 8, 4, 2000
    router = build_router("moec", dim=16, num_experts=E, k=2, cluster_size=S, expert_dropout=0.5)
    x = torch.randn(T, 16)
    router.eval()
    base = router(x)
    router.train()
    r = router(x)
    moved = r.meta["rerouted"]
    assert 0.3 < moved.float().mean() < 0.7
    filled = moved & (r.expert_ids >= 0)
    # a re-routed slot stays in the cluster of the expert it replaced
    assert torch.equal(r.expert_ids[filled] // S, base.expert_ids[filled] // S)
    assert torch.equal(r.expert_ids[~moved], base.expert_ids[~moved])
    for row in r.expert_ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))
    assert "cluster_variance" in r.aux and float(r.aux["cluster_variance"].detach()) > 0
