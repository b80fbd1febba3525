"""Random router: uniform distinct experts, fresh in training, deterministic in eval."""

import pytest
import torch

from moekit.routing import build_router


def test_eval_deterministic_train_varies():
    router = build_router("random", dim=16, num_experts=8, k=2)
    x = torch.randn(64, 16)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    other = build_router("random", dim=16, num_experts=8, k=2, seed=1).eval()
    assert not torch.equal(other(x).expert_ids, a.expert_ids)
    router.train()
    c, d = router(x), router(x)
    assert not torch.equal(c.expert_ids, d.expert_ids)


def test_distinct_uniform_and_weights():
    torch.manual_seed(0)
    E, k, T = 8, 3, 4000
    router = build_router("random", dim=16, num_experts=E, k=k)
    r = router(torch.randn(T, 16))
    assert all(len(set(row.tolist())) == k for row in r.expert_ids[:500])
    assert (r.expert_ids >= 0).all() and (r.expert_ids < E).all()
    torch.testing.assert_close(r.weights, torch.full((T, k), 1 / k))
    counts = r.tokens_per_expert().float()
    expected = T * k / E  # 1500, sd ~ 33
    assert (counts - expected).abs().max() < 150
    # Every unordered pair of experts appears about equally often (uniform k-subsets, not just marginals).
    pairs = torch.zeros(E, E)
    for row in r.expert_ids.tolist():
        for i in row:
            for j in row:
                if i < j:
                    pairs[i, j] += 1
    pair_counts = pairs[torch.triu(torch.ones(E, E, dtype=torch.bool), 1)]
    assert (pair_counts - T * 3 / 28).abs().max() < 100  # C(3,2)/C(8,2) of the tokens, sd ~ 20
    assert list(router.parameters()) == []


@pytest.mark.parametrize(("kwargs", "field"), [({"k": 9}, "k"), ({"k": 0}, "k"), ({"seed": "a"}, "seed")])
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("random", dim=16, num_experts=8, **kwargs)
