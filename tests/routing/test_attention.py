"""Attention router: scores are softmax(q k^T) v over the experts, not a linear gate."""

import torch

from moekit.routing import build_router


def test_scores_match_a_per_token_loop():
    torch.manual_seed(0)
    E, D = 6, 16
    router = build_router("attention", dim=D, num_experts=E, k=2).eval()
    x = torch.randn(5, D)
    W = router.query_key_value.weight.detach()  # [3E, D]
    with torch.no_grad():
        r = router(x)
    for t in range(5):
        q, k, v = (W[i * E:(i + 1) * E] @ x[t] for i in range(3))  # [E] each
        s = torch.stack([sum(torch.softmax(q[i] * k, dim=0)[j] * v[j] for j in range(E)) for i in range(E)])
        torch.testing.assert_close(r.logits[t], s, rtol=1e-5, atol=1e-5)
        p = torch.softmax(s, dim=0)
        top = torch.topk(p, 2)
        assert r.expert_ids[t].tolist() == top.indices.tolist()
        torch.testing.assert_close(r.weights[t], top.values / top.values.sum())


def test_zero_query_gives_every_expert_the_mean_value():
    # q = 0: each expert attends uniformly over all experts, so every score is mean(v): the
    # experts are coupled through the attention (a linear gate could never tie them this way).
    E, D = 8, 16
    router = build_router("attention", dim=D, num_experts=E).eval()
    with torch.no_grad():
        router.query_key_value.weight[:E] = 0.0
    x = torch.randn(7, D)
    s = router(x).logits
    v = x @ router.query_key_value.weight[2 * E:].detach().t()
    torch.testing.assert_close(s, v.mean(dim=1, keepdim=True).expand(7, E), rtol=1e-5, atol=1e-5)
