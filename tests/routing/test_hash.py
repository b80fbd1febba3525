"""Hash router: experts fixed by token id, independent of the batch; needs token ids."""

import pytest
import torch

from moekit.layers import Experts, MoE
from moekit.routing import RoutingContext, build_router


def test_same_id_same_experts_regardless_of_batch():
    router = build_router("hash", dim=16, num_experts=8, k=3)
    ids = torch.randint(0, 1000, (50,))
    a = router(torch.randn(50, 16), context=RoutingContext(token_ids=ids))
    perm = torch.randperm(50)
    b = router(torch.randn(50, 16), context=RoutingContext(token_ids=ids[perm]))
    assert torch.equal(a.expert_ids[perm], b.expert_ids)
    single = router(torch.randn(1, 16), context=RoutingContext(token_ids=ids[:1]))
    assert torch.equal(single.expert_ids[0], a.expert_ids[0])
    # Same id anywhere in the batch -> same experts.
    rep = router(torch.randn(4, 16), context=RoutingContext(token_ids=torch.tensor([7, 7, 7, 7])))
    assert (rep.expert_ids == rep.expert_ids[0]).all()


def test_distinct_experts_weights_and_logits():
    router = build_router("hash", dim=16, num_experts=8, k=4)
    r = router(torch.randn(300, 16), context=RoutingContext(token_ids=torch.arange(300)))
    assert all(len(set(row.tolist())) == 4 for row in r.expert_ids)
    assert (r.expert_ids >= 0).all() and (r.expert_ids < 8).all()
    torch.testing.assert_close(r.weights, torch.full((300, 4), 0.25))
    assert torch.equal(r.logits.sum(-1), torch.full((300,), 4.0))
    assert torch.equal(r.logits.gather(1, r.expert_ids), torch.ones(300, 4))
    assert list(router.parameters()) == []


def test_spread_and_seed():
    a = build_router("hash", dim=16, num_experts=8, seed=0)
    b = build_router("hash", dim=16, num_experts=8, seed=1)
    ids = torch.arange(8000)
    ra = a(torch.zeros(8000, 16), context=RoutingContext(token_ids=ids))
    rb = b(torch.zeros(8000, 16), context=RoutingContext(token_ids=ids))
    counts = ra.tokens_per_expert().float()
    assert (counts - 1000).abs().max() < 150  # ~uniform over experts (sd ~30)
    assert (ra.expert_ids != rb.expert_ids).float().mean() > 0.8  # another seed, another function
    # Consecutive ids are not mapped to consecutive experts.
    first = ra.expert_ids[:, 0]
    assert (first[1:] == (first[:-1] + 1) % 8).float().mean() < 0.2


def test_missing_token_ids_error():
    router = build_router("hash", dim=16, num_experts=8)
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(4, 16))
    with pytest.raises(ValueError, match="token_ids"):
        router(torch.randn(4, 16), context=RoutingContext(seq_len=4))
    with pytest.raises(ValueError, match="3 token ids for 4 tokens"):
        router(torch.randn(4, 16), context=RoutingContext(token_ids=torch.arange(3)))
    with pytest.raises(ValueError, match=">= 0"):
        router(torch.randn(2, 16), context=RoutingContext(token_ids=torch.tensor([1, -1])))


def test_through_moe_with_batched_ids():
    router = build_router("hash", dim=16, num_experts=8, k=2)
    moe = MoE(router=router, experts=Experts(num_experts=8, dim=16, hidden=32))
    tok = torch.randint(0, 100, (2, 5))
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, r = moe(x, token_ids=tok)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None
    direct = router(torch.randn(10, 16), context=RoutingContext(token_ids=tok.reshape(-1)))
    assert torch.equal(r.expert_ids, direct.expert_ids)


@pytest.mark.parametrize(("kwargs", "field"), [({"k": 9}, "k"), ({"k": 0}, "k"), ({"seed": 1.5}, "seed")])
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("hash", dim=16, num_experts=8, **kwargs)
