"""Steering: disabled experts are never chosen (a valid routing remains), forced experts serve every token."""

from __future__ import annotations

import pytest
import torch

from moekit.infer.steer import force_experts, parse_layer_experts, steer
from moekit.routing.routing import Routing


def _routings(model, ids):
    return {i: r for i, r in enumerate(model(ids).routings) if r is not None}


def test_disable_all_but_k_leaves_a_valid_routing(tiny_run):
    _, model = tiny_run
    ids = torch.randint(0, 272, (2, 10))
    with steer(model, disable={1: [0, 1, 2, 3, 4, 5]}):  # 8 experts, k=2: only 6 and 7 remain
        r = _routings(model, ids)
    used = r[1].expert_ids
    assert sorted(used.unique().tolist()) == [6, 7]
    assert (torch.sort(used, dim=1).values == torch.tensor([6, 7])).all()  # every token: both, no empty slot
    assert torch.allclose(r[1].weights.sum(1), torch.ones(20))  # renormalised over the remaining two
    assert (r[0].expert_ids < 6).any()  # other layers untouched
    after = _routings(model, ids)[1].expert_ids  # restored on exit
    assert (after < 6).any()


def test_disable_reroutes_like_masked_logits(tiny_run):
    """The slow reference: top-k of the router's softmax with the disabled experts' logits at -inf."""
    _, model = tiny_run
    ids = torch.randint(0, 272, (1, 12))
    with steer(model, disable={2: [3, 5]}):
        r = _routings(model, ids)[2]
    logits = r.logits.masked_fill(torch.tensor([0, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool), -float("inf"))
    w, e = torch.softmax(logits.float(), -1).topk(2, dim=-1)
    assert torch.equal(r.expert_ids, e)
    assert torch.allclose(r.weights, w / w.sum(-1, keepdim=True))


def test_force_expert_makes_every_token_use_it(tiny_run):
    _, model = tiny_run
    ids = torch.randint(0, 272, (2, 10))
    plain = _routings(model, ids)[0]
    assert not (plain.expert_ids == 4).any(dim=1).all()  # without forcing, some token skips expert 4
    with steer(model, force={0: [4]}):
        r = _routings(model, ids)[0]
    assert (r.expert_ids == 4).any(dim=1).all()
    kept = (plain.expert_ids == 4).any(dim=1)
    assert torch.equal(r.expert_ids[kept], plain.expert_ids[kept])  # tokens already using it: unchanged


def test_force_experts_replaces_the_lowest_weight_slot():
    r = Routing(torch.tensor([[0, 1], [2, -1], [3, 5]]), torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.4, 0.6]]),
                torch.zeros(3, 6), 6)
    out = force_experts(r, [5])
    assert out.expert_ids.tolist() == [[0, 5], [2, 5], [3, 5]]
    assert out.weights.tolist() == r.weights.tolist()


def test_steer_bad_input(tiny_run):
    _, model = tiny_run
    with pytest.raises(ValueError, match="leaves fewer"):
        with steer(model, disable={0: range(7)}):
            pass
    with pytest.raises(ValueError, match="not an MoE layer"):
        with steer(model, disable={9: [0]}):
            pass
    with pytest.raises(ValueError, match="experts 0..7"):
        with steer(model, force={0: [8]}):
            pass
    with pytest.raises(ValueError, match="cannot force 3"):
        with steer(model, force={0: [1, 2, 3]}):
            pass
    with pytest.raises(ValueError, match="both disabled and forced"):
        with steer(model, disable={0: [1]}, force={0: [1]}):
            pass
    assert parse_layer_experts("0:3, 0:5,1:2") == {0: [3, 5], 1: [2]}
    with pytest.raises(ValueError, match="LAYER:EXPERT"):
        parse_layer_experts("0-3")


def test_steer_works_on_the_offloaded_model(tiny_run):
    from moekit.infer import load_offloaded

    run, ref = tiny_run
    ids = torch.randint(0, 272, (1, 8))
    model = load_offloaded(run, expert_memory="50%")
    with steer(model, disable={1: [0, 1]}), steer(ref, disable={1: [0, 1]}):
        assert torch.equal(model.generate(ids, 8), ref.generate(ids, 8))
