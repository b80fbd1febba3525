"""SMEAR router: one distribution per example (causal: per prefix), every expert listed."""

import torch

from moekit.routing import RoutingContext, build_router


def test_causal_prefix_pooling_and_dense_slots():
    D, E = 16, 4
    router = build_router("smear", dim=D, num_experts=E)
    x = torch.randn(8, D)
    y = x.clone()
    y[5:] = torch.randn(3, D)
    a, b = router(x, context=RoutingContext(seq_len=8)), router(y, context=RoutingContext(seq_len=8))
    assert a.expert_ids.tolist() == [list(range(E))] * 8
    torch.testing.assert_close(a.weights[:5], b.weights[:5])  # never reads later tokens
    assert not torch.allclose(a.weights[5:], b.weights[5:])
    torch.testing.assert_close(a.weights[3], torch.softmax(router.weight @ x[:4].mean(0), -1), rtol=1e-5, atol=1e-6)
    assert "example_weights" not in a.meta


def test_non_causal_gives_one_distribution_per_sequence():
    router = build_router("smear", dim=16, num_experts=4, causal=False)
    x = torch.randn(2 * 6, 16)
    r = router(x, context=RoutingContext(seq_len=6))
    w = r.weights.reshape(2, 6, 4)
    assert (w == w[:, :1]).all() and not torch.allclose(w[0, 0], w[1, 0])
    torch.testing.assert_close(r.meta["example_weights"], w[:, 0])
    torch.testing.assert_close(w[1, 0], torch.softmax(router.weight @ x[6:].mean(0), -1), rtol=1e-5, atol=1e-6)
