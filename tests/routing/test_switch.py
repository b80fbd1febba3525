"""Switch router: top-1 with softmax weight, capacity never exceeded, dropped count exact."""

import math

import pytest
import torch

from moekit.routing import build_router


def _brute_force(probs, k, capacity):
    """Slot-major token-order filling: every first choice, in token order, then second choices."""
    top, ids = probs.topk(k, dim=-1)
    used = [0] * probs.shape[1]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for j in range(k):
        for t in range(probs.shape[0]):
            e = int(ids[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t, j] = True
    return ids, top, keep


@pytest.mark.parametrize(("k", "cf"), [(1, 1.0), (1, 1.25), (2, 0.5), (1, 0.3)])
def test_capacity_matches_brute_force(k, cf):
    torch.manual_seed(k)
    E, T = 8, 40
    router = build_router("switch", dim=16, num_experts=E, k=k, capacity_factor=cf).eval()
    with torch.no_grad():
        router.weight[0] += 1.0  # skew toward expert 0 so it overflows
    x = torch.randn(T, 16) + 0.5
    r = router(x)
    C = math.ceil(cf * T * k / E)
    assert (r.tokens_per_expert() <= C).all()
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    ids, top, keep = _brute_force(probs, k, C)
    assert int(r.dropped) == int((~keep).sum()) > 0
    assert torch.equal(r.expert_ids, torch.where(keep, ids, -1))
    torch.testing.assert_close(r.weights, torch.where(keep, top, torch.zeros(())))


def test_top1_weight_is_softmax_probability():
    torch.manual_seed(0)
    router = build_router("switch", dim=16, num_experts=8, capacity_factor=None).eval()
    x = torch.randn(30, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    assert r.expert_ids.shape == (30, 1)
    assert torch.equal(r.expert_ids[:, 0], probs.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values)  # not renormalised to 1
    assert r.dropped is None


def test_large_capacity_drops_nothing():
    torch.manual_seed(1)
    router = build_router("switch", dim=16, num_experts=4, capacity_factor=4.0).eval()
    with torch.no_grad():
        router.weight[2] += 5.0
    r = router(torch.randn(32, 16).abs())
    assert int(r.dropped) == 0 and (r.expert_ids >= 0).all()


def test_load_balance_loss_value():
    torch.manual_seed(2)
    router = build_router("switch", dim=16, num_experts=4, capacity_factor=0.5, load_balance=0.01,
                          z_loss=0.001).eval()
    x = torch.randn(16, 16)
    r = router(x)
    logits = x @ router.weight.t()
    probs = torch.softmax(logits, dim=-1)
    f = torch.bincount(probs.argmax(-1), minlength=4).float() / 16  # before capacity, as the paper
    torch.testing.assert_close(r.aux["load_balance"], 0.01 * 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(r.aux["z_loss"], 0.001 * torch.logsumexp(logits, -1).square().mean())


def test_jitter_only_in_training():
    torch.manual_seed(3)
    router = build_router("switch", dim=16, num_experts=8, jitter_eps=0.5, capacity_factor=None)
    x = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"k": 9}, "k"), ({"k": 0}, "k"), ({"capacity_factor": -1.0}, "capacity_factor"),
     ({"capacity_factor": 0}, "capacity_factor"), ({"jitter_eps": 1.5}, "jitter_eps"),
     ({"load_balance": -0.1}, "load_balance")],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("switch", dim=16, num_experts=8, **kwargs)
