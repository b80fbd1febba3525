"""Null-experts router (AdaMoE): null choices are empty, cost nothing, and count as one group in the loss."""

import pytest
import torch

import moekit.layers.dispatch as dispatch
from moekit.layers import Experts, MoE
from moekit.routing import build_router
from moekit.routing.null_experts import null_load_balance_loss


def test_null_choices_are_empty_slots_recorded_in_meta():
    torch.manual_seed(0)
    E, N, k = 4, 3, 3
    router = build_router("null_experts", dim=16, num_experts=E, num_null=N, k=k).eval()
    x = torch.randn(50, 16)
    r = router(x)
    assert r.logits.shape == (50, E + N) and r.num_experts == E
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    top, ids = probs.topk(k, dim=-1)
    w = top / top.sum(-1, keepdim=True)
    null = ids >= E
    assert null.any() and (~null).any()
    assert torch.equal(r.expert_ids, torch.where(null, -1, ids))
    torch.testing.assert_close(r.weights, torch.where(null, 0.0, w))
    torch.testing.assert_close(r.meta["null_weight"], torch.where(null, w, 0.0))
    torch.testing.assert_close(r.weights.sum(-1) + r.meta["null_weight"].sum(-1), torch.ones(50))


def test_unnormalized_weights_are_probabilities():
    torch.manual_seed(1)
    router = build_router("null_experts", dim=16, num_experts=4, num_null=2, k=2, normalize=False).eval()
    x = torch.randn(10, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    torch.testing.assert_close(r.weights + r.meta["null_weight"], probs.topk(2, dim=-1).values)


def test_experts_compute_only_real_slots(monkeypatch):
    torch.manual_seed(2)
    router = build_router("null_experts", dim=16, num_experts=4, num_null=4, k=3)
    experts = Experts(num_experts=4, dim=16, hidden=32, backend="loop")
    moe = MoE(router=router, experts=experts)
    rows = []
    real = dispatch.fused_expert_mlp

    def counting(x, w1, w2, counts, act, gated):
        rows.append((x.shape[0], sum(counts)))
        return real(x, w1, w2, counts, act, gated)

    monkeypatch.setattr(dispatch, "fused_expert_mlp", counting)
    x = torch.randn(40, 16)
    y, r = moe(x)
    n_real = int((r.expert_ids >= 0).sum())
    assert n_real < 40 * 3
    assert rows == [(n_real, n_real)]  # the experts see only the real slots
    # The same output as the eager reference over the real slots alone.
    ref = experts(x, r, backend="eager")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_null_group_load_balance_hand_computed():
    # E = 2 real, N = 2 null, T = 2 tokens, k = 1.
    probs = torch.tensor([[0.4, 0.1, 0.3, 0.2],
                          [0.2, 0.2, 0.1, 0.5]])
    ids = torch.tensor([[0], [3]])  # token 0 -> real expert 0, token 1 -> null expert 3
    # f = [1/2, 0, 0, 1/2]; P = [0.3, 0.15, 0.2, 0.35]; null group: f = 1/4, P = 0.275 for both nulls.
    # loss = 4 * (0.5*0.3 + 0*0.15 + 2 * 0.25*0.275) = 4 * (0.15 + 0.1375) = 1.15
    assert null_load_balance_loss(probs, ids, 2).item() == pytest.approx(1.15)
    # Plain E+N load balance would be 4 * (0.5*0.3 + 0.5*0.35) = 1.3: the nulls are not balanced apart.
    router = build_router("null_experts", dim=16, num_experts=2, num_null=2, k=1, load_balance=0.5)
    r = router(torch.randn(8, 16))
    probs = torch.softmax(r.logits, -1)
    # Which null a token took does not matter to the loss (nulls enter as a group mean).
    raw = torch.where(r.expert_ids >= 0, r.expert_ids, 2)
    torch.testing.assert_close(r.aux["load_balance"], 0.5 * null_load_balance_loss(probs, raw, 2))


def test_uniform_gives_one():
    probs = torch.full((6, 6), 1 / 6)
    ids = torch.arange(6).repeat(2).reshape(6, 2)  # every expert (real or null) used twice
    assert null_load_balance_loss(probs, ids, 4).item() == pytest.approx(1.0)


def test_positive_null_bias_reduces_active_experts():
    torch.manual_seed(3)
    E, N = 8, 4
    router = build_router("null_experts", dim=16, num_experts=E, num_null=N, k=4).eval()
    x = torch.randn(200, 16)
    x[:, -1] = 1.0  # a constant feature: its gate column acts as a logit bias
    before = router(x).active_per_token().float().mean()
    with torch.no_grad():
        router.weight[E:, -1] += 5.0  # +5 on every null logit
    after = router(x).active_per_token().float().mean()
    assert after < before - 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"num_null": 0}, "num_null"), ({"num_null": 1.5}, "num_null"), ({"k": 10}, "k"), ({"k": 0}, "k"),
     ({"load_balance": -1.0}, "load_balance")],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("null_experts", dim=16, num_experts=8, **kwargs)
