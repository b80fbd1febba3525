"""SMoE-Dropout: frozen random router, k grows linearly during training, any k at inference."""

import torch

from moekit.routing import build_router


def test_k_grows_linearly_and_router_is_frozen():
    E = 8
    router = build_router("smoe_dropout", dim=16, num_experts=E, k_start=1, anneal_steps=7)
    assert not list(router.parameters())
    w0 = router.weight.clone()
    x = torch.randn(5, 16, requires_grad=True)
    ks = [router(x).top_k for _ in range(9)]
    assert ks == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert torch.equal(router.weight, w0) and int(router.steps_seen) == 9


def test_self_slimmable_inference_and_seeded_gate():
    E = 8
    a = build_router("smoe_dropout", dim=16, num_experts=E, seed=3).eval()
    b = build_router("smoe_dropout", dim=16, num_experts=E, seed=3).eval()
    assert torch.equal(a.weight, b.weight)  # same config, same frozen gate
    x = torch.randn(6, 16)
    full = a(x)
    assert full.top_k == E
    for k in (1, 2, 5):
        a.eval_k = k
        r = a(x)
        assert r.top_k == k
        # the k experts kept are the k best of the full ranking (nested sub-networks)
        assert torch.equal(r.expert_ids, full.expert_ids[:, :k])
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(6))
