"""topk against a naive per-token reference, its options and bad input."""

from __future__ import annotations

import pytest
import torch

from moekit.routing import build_router


def naive_topk(logits: torch.Tensor, k: int, normalize: bool, order: str):
    ids, ws = [], []
    for row in logits:
        p = torch.softmax(row, -1)
        idx = sorted(range(len(row)), key=lambda i: -float(row[i].detach()))[:k]
        if order == "softmax_topk":
            w = p[idx]
            if normalize:
                w = w / w.sum()
        else:
            w = torch.softmax(row[idx], -1)
        ids.append(idx)
        ws.append(w)
    return torch.tensor(ids), torch.stack(ws)


@pytest.mark.parametrize("order,normalize", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)])
def test_topk_matches_naive(order, normalize):
    r = build_router("topk", dim=8, num_experts=6, k=3, order=order, normalize=normalize).eval()
    x = torch.randn(10, 8)
    out = r(x)
    ids, ws = naive_topk(out.logits, 3, normalize, order)
    assert torch.equal(out.expert_ids, ids)
    torch.testing.assert_close(out.weights, ws)
    if normalize or order == "topk_softmax":
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
    else:
        assert torch.all(out.weights.sum(-1) < 1)


def test_noise_only_in_training():
    r = build_router("topk", dim=8, num_experts=6, k=2, noise="noisy")
    with torch.no_grad():
        r.noise_weight.fill_(1.0)
    x = torch.randn(64, 8)
    r.train()
    a, b = r(x), r(x)
    assert not torch.equal(a.weights, b.weights)
    r.eval()
    assert torch.equal(r(x).weights, r(x).weights)


def test_aux_losses_are_scaled_by_coefficients():
    x = torch.randn(32, 8)
    r1 = build_router("topk", dim=8, num_experts=4, k=2, load_balance=1.0, z_loss=1.0)
    r2 = build_router("topk", dim=8, num_experts=4, k=2, load_balance=0.5, z_loss=0.0)
    r2.load_state_dict(r1.state_dict())
    a, b = r1(x), r2(x)
    torch.testing.assert_close(b.aux["load_balance"], 0.5 * a.aux["load_balance"])
    assert "z_loss" in a.aux and "z_loss" not in b.aux


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=7), dict(order="sideways"), dict(noise="loud")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_router("topk", dim=8, num_experts=6, **bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise(value):
    r = build_router("topk", dim=8, num_experts=4)
    x = torch.randn(5, 8)
    x[2, 3] = value
    with pytest.raises(FloatingPointError, match="non-finite"):
        r(x)
