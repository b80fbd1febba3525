"""Graph-of-tokens routing: probabilities averaged over similar tokens of the same sequence."""

import torch

from moekit.routing import RoutingContext, build_router


def test_causal_routing_never_reads_the_future():
    torch.manual_seed(0)
    router = build_router("graph_of_tokens", dim=16, num_experts=8).eval()
    x = torch.randn(2 * 10, 16)
    y = x.clone()
    y[7:10] = torch.randn(3, 16)  # change the end of the first sequence
    a, b = router(x, context=RoutingContext(seq_len=10)), router(y, context=RoutingContext(seq_len=10))
    torch.testing.assert_close(a.meta["smoothed"][:7], b.meta["smoothed"][:7])
    torch.testing.assert_close(a.meta["smoothed"][10:], b.meta["smoothed"][10:])  # the other sequence
    assert not torch.allclose(a.meta["smoothed"][7:10], b.meta["smoothed"][7:10])


def test_smoothing_is_graph_average_and_large_temperature_shares_routing():
    torch.manual_seed(1)
    L = 6
    x = torch.randn(L, 16)
    router = build_router("graph_of_tokens", dim=16, num_experts=8, causal=False).eval()
    r = router(x, context=RoutingContext(seq_len=L))
    z = x @ router.weight.detach().t()
    A = torch.softmax(z @ z.t() / (8 ** 0.5), dim=-1)
    torch.testing.assert_close(r.meta["smoothed"], A @ torch.softmax(z, dim=-1), rtol=1e-5, atol=1e-6)
    flat = build_router("graph_of_tokens", dim=16, num_experts=8, causal=False, temperature=1e6).eval()
    flat.load_state_dict(router.state_dict())
    s = flat(x, context=RoutingContext(seq_len=L))
    assert (s.expert_ids == s.expert_ids[0]).all()  # every token follows the sequence consensus
