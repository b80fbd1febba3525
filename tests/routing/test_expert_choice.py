"""Expert-choice router: each expert takes exactly C tokens, weights are the softmax scores."""

import math

import pytest
import torch

from moekit.routing import build_router


def _naive(scores, C):
    """Per-expert top-C loop -> {(token, expert): score}."""
    pairs = {}
    for e in range(scores.shape[1]):
        for t in torch.topk(scores[:, e], C).indices.tolist():
            pairs[(t, e)] = float(scores[t, e])
    return pairs


@pytest.mark.parametrize(
    ("T", "E", "k", "cf"), [(32, 8, 2, 1.0), (10, 4, 1, 2.0), (7, 8, 1, 1.0), (5, 4, 4, 3.0)]
)
def test_matches_naive_per_expert_topc(T, E, k, cf):
    torch.manual_seed(T + E)
    router = build_router("expert_choice", dim=16, num_experts=E, k=k, capacity_factor=cf).eval()
    x = torch.randn(T, 16)
    with torch.no_grad():
        r = router(x)
    C = min(math.ceil(cf * T * k / E), T)
    assert int(r.meta["capacity"]) == C
    scores = torch.softmax(x @ router.weight.detach().t(), dim=-1)
    ref = _naive(scores, C)
    got = {}
    for t in range(T):
        for slot in range(r.top_k):
            e = int(r.expert_ids[t, slot])
            if e < 0:
                assert r.weights[t, slot] == 0
            else:
                got[(t, e)] = float(r.weights[t, slot])
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-6)
    # Every expert has exactly C tokens; width is the max experts any token got.
    assert torch.equal(r.tokens_per_expert(), torch.full((E,), C))
    per_token = (r.expert_ids >= 0).sum(1)
    assert r.top_k == int(per_token.max())
    assert int(r.dropped) == int((per_token == 0).sum())
    # Slots are sorted by weight, empty slots last.
    assert (r.weights[:, :-1] >= r.weights[:, 1:]).all()


def test_dropped_counts_unchosen_tokens():
    torch.manual_seed(0)
    router = build_router("expert_choice", dim=16, num_experts=2, k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0
        router.weight[1, 0] = -1.0
    # Token scores depend only on x[:, 0]: the extremes are chosen, the middle tokens are not.
    x = torch.zeros(8, 16)
    x[:, 0] = torch.tensor([-4.0, -3.0, -0.2, -0.1, 0.1, 0.2, 3.0, 4.0])
    r = router(x)  # C = ceil(8 * 1 / 2) = 4 per expert -> all 8 tokens chosen exactly once
    assert int(r.dropped) == 0 and r.top_k == 1
    router.capacity_factor = 0.5  # C = 2: the middle four tokens get no expert
    r = router(x)
    assert int(r.dropped) == 4
    assert r.expert_ids[:, 0].tolist() == [1, 1, -1, -1, -1, -1, 0, 0]


def test_capacity_capped_at_T():
    router = build_router("expert_choice", dim=16, num_experts=4, k=4, capacity_factor=4.0).eval()
    r = router(torch.randn(3, 16))
    assert int(r.meta["capacity"]) == 3 and r.top_k == 4 and (r.expert_ids >= 0).all()


def test_z_loss_and_grad():
    torch.manual_seed(1)
    router = build_router("expert_choice", dim=16, num_experts=4, z_loss=0.01)
    x = torch.randn(12, 16)
    r = router(x)
    logits = x @ router.weight.t()
    torch.testing.assert_close(r.aux["z_loss"], 0.01 * torch.logsumexp(logits, -1).square().mean())
    (r.weights.sum() + r.total_aux()).backward()
    assert router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"k": 9}, "k"), ({"capacity_factor": -1.0}, "capacity_factor"),
     ({"capacity_factor": 0}, "capacity_factor"), ({"z_loss": -1.0}, "z_loss")],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("expert_choice", dim=16, num_experts=8, **kwargs)
