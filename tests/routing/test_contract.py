"""One contract test over every registered router (DESIGN.md contract 1 and 2)."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.layers import Experts, MoE
from moekit.routing import (
    Routing,
    RoutingContext,
    build_router,
    get_router,
    list_routers,
    router_config,
    router_from_config,
)

D, E, T, L = 16, 8, 24, 12  # width, experts, tokens (2 sequences of 12)


def make(name: str) -> torch.nn.Module:
    return build_router(name, dim=D, num_experts=E)


def context_for(T: int) -> RoutingContext:
    return RoutingContext(seq_len=L, token_ids=torch.arange(T) * 7 % 50)


@pytest.fixture(params=list_routers())
def name(request) -> str:
    return request.param


def test_registry_lists_core_routers():
    assert {"topk"} <= set(list_routers())
    with pytest.raises(KeyError, match="known routers: .*topk"):
        get_router("no-such-router")


def test_shapes_ranges_and_empty_slots(name):
    router = make(name).train()
    x = torch.randn(T, D)
    r = router(x, context=context_for(T))
    assert isinstance(r, Routing)
    k = r.expert_ids.shape[1]
    assert r.expert_ids.shape == (T, k) and r.weights.shape == (T, k) and k >= 1
    assert r.expert_ids.dtype == torch.long
    assert r.logits.shape[0] == T and r.logits.shape[1] >= E
    assert r.num_experts == E
    assert int(r.expert_ids.min()) >= -1 and int(r.expert_ids.max()) < E
    empty = r.expert_ids < 0
    assert torch.all(r.weights[empty] == 0), "empty slots must carry zero weight"
    assert torch.isfinite(r.weights).all()
    assert torch.all(r.weights >= 0)
    for key, v in r.aux.items():
        assert v.dim() == 0 and torch.isfinite(v), key
    # a token never lists the same real expert twice
    for row in r.expert_ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))


def test_gradients_reach_router_parameters(name):
    router = make(name).train()
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"{name} has no trainable parameters")
    moe = MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=32))
    x = torch.randn(2, L, D)
    y, r = moe(x, token_ids=(torch.arange(2 * L) * 7 % 50).reshape(2, L))
    (y.square().mean() + r.total_aux()).backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0, "router parameters got zero gradient"


def test_eval_mode_is_deterministic(name):
    router = make(name).eval()
    x = torch.randn(T, D)
    a, b = router(x, context=context_for(T)), router(x, context=context_for(T))
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.weights, b.weights)


def test_config_round_trips_through_json(name):
    router = make(name).eval()
    cfg = json.loads(json.dumps(router_config(router)))
    assert cfg["name"] == name and cfg["args"]["dim"] == D and cfg["args"]["num_experts"] == E
    clone = router_from_config(cfg).eval()
    assert router_config(clone) == cfg
    clone.load_state_dict(router.state_dict())
    x = torch.randn(T, D)
    a, b = router(x, context=context_for(T)), clone(x, context=context_for(T))
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)


def test_wrong_rank_or_width_is_a_clear_error(name):
    router = make(name)
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        router(torch.randn(2, T, D), context=context_for(2 * T))
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        router(torch.randn(T, D + 1), context=context_for(T))


def test_unknown_argument_lists_accepted_ones(name):
    with pytest.raises(TypeError, match="accepts"):
        build_router(name, dim=D, num_experts=E, no_such_arg=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(name, bad):
    """Every router refuses NaN/inf tokens instead of routing them silently (hash/random included)."""
    for mode in ("train", "eval"):
        router = getattr(make(name), mode)()
        x = torch.randn(T, D)
        x[3, 5] = bad
        with pytest.raises(FloatingPointError, match="non-finite"):
            router(x, context=context_for(T))


def test_every_loss_coefficient_is_validated_by_the_base_class(name):
    router = make(name)
    for loss in router.loss_names:
        assert getattr(router, loss) == router_config(router)["args"][loss]
        for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
            with pytest.raises(ValueError, match=f"{loss} must be a finite number >= 0, got"):
                build_router(name, dim=D, num_experts=E, **{loss: bad})


def test_routers_with_losses_declare_them():
    assert set(make("topk").loss_names) == {"load_balance", "seq_balance", "z_loss"}
    assert set(make("topp").loss_names) == {"dynamic_loss", "load_balance", "seq_balance", "z_loss"}
    assert make("hash").loss_names == ()
    with pytest.raises(ValueError, match="load_balance must be a finite number >= 0, got -1.0"):
        build_router("topk", dim=D, num_experts=E, load_balance=-1.0)


def test_routers_declare_what_they_need(name):
    """`needs_token_ids`, `needs_full_sequence` and `needs_previous` say what a router reads from its context."""
    router = make(name).eval()
    x = torch.randn(T, D)
    ids = torch.arange(T) * 7 % 50
    if router.needs_token_ids:
        with pytest.raises(ValueError, match="token id"):
            router(x, context=RoutingContext(seq_len=L))
    else:
        router(x, context=RoutingContext(seq_len=L))  # works without ids
    one = router(x, context=RoutingContext(seq_len=T, token_ids=ids))  # the rows as one sequence
    two = router(x, context=RoutingContext(seq_len=L, token_ids=ids))  # ... as two
    same = torch.equal(one.expert_ids, two.expert_ids) and torch.equal(one.weights, two.weights)
    assert same != router.needs_full_sequence, "only routers that read whole sequences depend on seq_len"
    if not router.needs_previous:
        h = torch.randn(T, 8)
        prev = Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), torch.zeros(T, E), E, state=h)
        other = router(x, context=RoutingContext(seq_len=L, token_ids=ids, previous=prev))
        assert torch.equal(other.expert_ids, two.expert_ids)
