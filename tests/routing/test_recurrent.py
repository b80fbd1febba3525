"""Recurrent router (RMoE): routing state flows from layer to layer through Routing.state."""

import pytest
import torch

from moekit.models import MoELM
from moekit.routing import Routing, RoutingContext, build_router
from tests.helpers import tiny_lm


def previous(h: torch.Tensor) -> RoutingContext:
    """A context whose previous layer handed on the recurrent state h [T, H]."""
    ids = torch.zeros(h.shape[0], 1, dtype=torch.long)
    return RoutingContext(previous=Routing(ids, torch.ones(h.shape[0], 1), torch.zeros(h.shape[0], 4), 4, state=h))


def test_state_changes_routing_and_carries_gradient():
    torch.manual_seed(0)
    D, E, T = 16, 8, 20
    first = build_router("recurrent", dim=D, num_experts=E, hidden=8)
    second = build_router("recurrent", dim=D, num_experts=E, hidden=8)
    x = torch.randn(T, D)
    r1 = first(x)
    assert r1.state.shape == (T, 8)
    # no previous state == a zero previous state
    torch.testing.assert_close(second(x).logits, second(x, context=previous(torch.zeros(T, 8))).logits)
    r2 = second(x, context=RoutingContext(previous=r1))
    assert not torch.allclose(r2.logits, second(x).logits)  # the previous layer's state matters
    r2.logits.square().sum().backward()
    assert first.gru.weight_hh.grad is not None and first.gru.weight_ih.grad.abs().sum() > 0


def test_detach_state_stops_gradient_and_bad_state_is_an_error():
    D, E, T = 16, 8, 6
    first = build_router("recurrent", dim=D, num_experts=E, hidden=8)
    second = build_router("recurrent", dim=D, num_experts=E, hidden=8, detach_state=True)
    x = torch.randn(T, D)
    second(x, context=RoutingContext(previous=first(x))).logits.sum().backward()
    assert first.gru.weight_ih.grad is None
    with pytest.raises(ValueError, match=r"\[6, 8\]"):
        second(x, context=previous(torch.zeros(T, 5)))


def test_lm_threads_state_through_layers():
    cfg = tiny_lm(n_layers=3, max_seq_len=16, num_experts=4, expert_hidden=16, router="recurrent",
                  router_args={"k": 2, "hidden": 8})
    model = MoELM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, targets=ids)
    assert all(r.state.shape == (16, 8) for r in out.routings)
    # the last layer's routing depends on the first layer's router (through the GRU state)
    out.routings[-1].logits.sum().backward()
    assert model.layers[0].mlp.router.gru.weight_ih.grad.abs().sum() > 0
