"""Mixture of Routers: joint scores are the main router's mixture of the sub-routers' proposals."""

import torch

from moekit.routing import build_router


def test_dominant_sub_router_decides():
    torch.manual_seed(0)
    D, E = 16, 8
    router = build_router("mixture_of_routers", dim=D, num_experts=E, k=2, num_routers=3).eval()
    x = torch.randn(30, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.main_weight.zero_()
        router.main_weight[1, 0] = 100.0  # the main router puts all weight on sub-router 1
        r = router(x)
    assert torch.allclose(r.meta["router_weights"][:, 1], torch.ones(30))
    own = torch.softmax(x @ router.sub_weight[1].detach().t(), dim=-1).topk(2)
    assert torch.equal(r.expert_ids.sort(dim=1).values, own.indices.sort(dim=1).values)


def test_joint_score_is_weighted_sum_of_sparse_proposals():
    torch.manual_seed(1)
    D, E, R = 16, 8, 4
    router = build_router("mixture_of_routers", dim=D, num_experts=E, k=3, num_routers=R, router_k=2).eval()
    x = torch.randn(10, D)
    with torch.no_grad():
        r = router(x)
        a = torch.softmax(x @ router.main_weight.t(), dim=-1)  # [T, R]
        score = torch.zeros(10, E)
        for j in range(R):
            p = torch.softmax(x @ router.sub_weight[j].t(), dim=-1)
            top = p.topk(2)
            score.scatter_add_(1, top.indices, a[:, j:j + 1] * top.values)
    for t in range(10):
        nz = int((score[t] > 0).sum())
        kept = min(nz, 3)
        ref = score[t].topk(kept)
        assert set(r.expert_ids[t, :kept].tolist()) == set(ref.indices.tolist())
        torch.testing.assert_close(r.weights[t, :kept].sum(), torch.tensor(1.0))
