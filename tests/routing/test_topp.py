"""Top-p router: the smallest prefix of sorted probabilities reaching p, capped, not renormalised."""

import math

import pytest
import torch

from moekit.routing import build_router


def _brute_force(prob_row, p, max_k):
    """Smallest set of top experts whose probabilities sum to >= p (at most max_k of them)."""
    order = sorted(range(len(prob_row)), key=lambda e: -prob_row[e])
    for n in range(1, len(order) + 1):
        if sum(prob_row[e] for e in order[:n]) >= p or n == max_k:
            return {e: prob_row[e] for e in order[:n]}
    raise AssertionError


@pytest.mark.parametrize(
    ("p", "max_k", "scale"), [(0.4, None, 1.0), (0.8, None, 0.5), (0.9, 3, 0.3), (1.0, None, 2.0)]
)
def test_minimal_prefix_brute_force(p, max_k, scale):
    torch.manual_seed(int(p * 10))
    E = 8
    router = build_router("topp", dim=16, num_experts=E, p=p, max_k=max_k).eval()
    x = torch.randn(60, 16) * scale
    with torch.no_grad():
        r = router(x)
    assert r.top_k == (max_k or E)
    probs = torch.softmax(x @ router.weight.detach().t(), dim=-1).double()
    for t in range(60):
        ref = _brute_force(probs[t].tolist(), p, max_k or E)
        got = {int(e): float(w) for e, w in zip(r.expert_ids[t], r.weights[t], strict=True) if e >= 0}
        assert got.keys() == ref.keys(), t
        for e in ref:  # the probabilities themselves: not renormalised
            assert got[e] == pytest.approx(ref[e], abs=1e-6)
        n = len(ref)
        assert (r.expert_ids[t, n:] == -1).all() and (r.weights[t, n:] == 0).all()
    if max_k:
        assert (r.active_per_token() <= max_k).all()
    if p == 1.0 and max_k is None:
        assert (r.active_per_token() == E).all()  # all probabilities needed (within float rounding)


def test_peaked_distribution_uses_one_expert():
    router = build_router("topp", dim=16, num_experts=8, p=0.5).eval()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[3, 0] = 10.0
    x = torch.zeros(4, 16)
    x[:, 0] = 1.0
    r = router(x)
    assert (r.active_per_token() == 1).all() and (r.expert_ids[:, 0] == 3).all()
    assert (r.weights[:, 0] < 1).all()  # raw probability


def test_losses():
    torch.manual_seed(0)
    router = build_router("topp", dim=16, num_experts=4, p=0.6, load_balance=0.1, dynamic_loss=0.01).eval()
    x = torch.randn(20, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(r.aux["dynamic"], 0.01 * entropy)
    counts = torch.stack([(r.expert_ids == e).sum() for e in range(4)]).float()
    f = counts / counts.sum()  # share of the used slots
    torch.testing.assert_close(r.aux["load_balance"], 0.1 * 4 * (f * probs.mean(0)).sum())
    # Uniform probabilities and uniform use give exactly the coefficient.
    with torch.no_grad():
        router.weight.zero_()
    u = router(x)
    assert u.aux["load_balance"].item() == pytest.approx(0.1)
    assert u.aux["dynamic"].item() == pytest.approx(0.01 * math.log(4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"p": 0.0}, "p"), ({"p": 1.5}, "p"), ({"p": -0.2}, "p"), ({"max_k": 9}, "max_k"),
     ({"max_k": 0}, "max_k"), ({"dynamic_loss": -1.0}, "dynamic_loss")],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("topp", dim=16, num_experts=8, **kwargs)
