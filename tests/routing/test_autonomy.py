"""Autonomy-of-Experts router: experts chosen by the norm of their low-rank activation."""

import torch

from moekit.routing import build_router


def test_selection_by_activation_norm_and_latent():
    torch.manual_seed(0)
    D, E, r, k = 16, 6, 3, 2
    router = build_router("autonomy", dim=D, num_experts=E, k=k, rank=r).eval()
    x = torch.randn(9, D)
    out = router(x)
    z = torch.einsum("td,erd->ter", x, router.factor_a.detach())  # [T, E, r]
    torch.testing.assert_close(out.logits, z.norm(dim=-1))
    top = torch.softmax(z.norm(dim=-1), -1).topk(k)
    assert torch.equal(out.expert_ids, top.indices)
    torch.testing.assert_close(out.weights, top.values / top.values.sum(-1, keepdim=True))
    for t in range(9):  # the latent of each chosen expert is its own A_e x
        for s in range(k):
            torch.testing.assert_close(out.meta["latent"][t, s], z[t, out.expert_ids[t, s]])


def test_scaling_one_experts_factor_makes_it_win():
    router = build_router("autonomy", dim=16, num_experts=4, k=1, rank=2)
    with torch.no_grad():
        router.factor_a[2] *= 100.0  # expert 2 "recognises" every token most strongly
    assert (router(torch.randn(20, 16)).expert_ids == 2).all()
