"""Test-time re-routing: dynamic k (top-p over top-k) and C3PO re-mixing from reference neighbours."""

from __future__ import annotations

import pytest
import torch

from moekit.infer.reroute import (
    References,
    build_references,
    c3po,
    c3po_weights,
    dynamic_k,
    embed_and_route,
    remix,
    top_p_routing,
)
from moekit.infer.steer import steer
from moekit.routing.routing import Routing


def _routings(model, ids):
    return {i: r for i, r in enumerate(model(ids).routings) if r is not None}


def test_dynamic_k_threshold_one_equals_top_k(tiny_run):
    _, model = tiny_run
    ids = torch.randint(0, 272, (2, 9))
    plain = _routings(model, ids)
    with dynamic_k(model, 1.0):
        out = model(ids)
    for l, r in plain.items():
        assert torch.equal(out.routings[l].expert_ids, r.expert_ids)
        assert torch.equal(out.routings[l].weights, r.weights)


def test_dynamic_k_matches_a_slow_reference_and_stays_valid(tiny_run):
    _, model = tiny_run
    ids = torch.randint(0, 272, (2, 9))
    plain = _routings(model, ids)
    with dynamic_k(model, {1: 0.3}):
        r = _routings(model, ids)
    assert torch.equal(r[0].expert_ids, plain[0].expert_ids)  # other layers untouched
    p1 = plain[1]
    probs = torch.softmax(p1.logits.detach().float(), -1)
    n_kept = 0
    for t in range(p1.num_tokens):  # slow reference: one token at a time
        ps = [(float(probs[t, e]), j) for j, e in enumerate(p1.expert_ids[t].tolist())]
        ps.sort(reverse=True)
        keep, acc = set(), 0.0
        for pv, j in ps:
            if acc < 0.3:
                keep.add(j)
            acc += pv
        n_kept += len(keep)
        for j in range(p1.top_k):
            if j in keep:
                assert r[1].expert_ids[t, j] == p1.expert_ids[t, j]
            else:
                assert r[1].expert_ids[t, j] == -1 and r[1].weights[t, j] == 0
        assert torch.allclose(r[1].weights[t].sum(), p1.weights[t].sum())  # rescaled to the original sum
    assert n_kept < p1.expert_ids.numel()  # some token went to fewer than k experts
    assert (r[1].expert_ids >= 0).any(dim=1).all()  # every token keeps at least one expert
    with dynamic_k(model, 0.3):  # a full forward runs on a routing with empty slots
        assert torch.isfinite(model(ids).logits).all()


def test_dynamic_k_bad_input(tiny_run):
    _, model = tiny_run
    with pytest.raises(ValueError, match="threshold must be in"):
        with dynamic_k(model, 0.0):
            pass
    with pytest.raises(ValueError, match="not MoE layers"):
        with dynamic_k(model, {7: 0.5}):
            pass


def test_dynamic_k_nests_with_steer(tiny_run):
    _, model = tiny_run
    ids = torch.randint(0, 272, (1, 8))
    with steer(model, disable={0: [0, 1, 2, 3, 4, 5]}):
        with dynamic_k(model, 1.0):
            assert set(_routings(model, ids)[0].expert_ids.unique().tolist()) <= {6, 7}
        assert set(_routings(model, ids)[0].expert_ids.unique().tolist()) <= {6, 7}  # steer still on
    assert "forward" not in model.layers[0].mlp.router.__dict__


def test_c3po_with_itself_as_only_neighbour_reproduces_its_routing(tiny_run):
    _, model = tiny_run
    q = torch.randint(0, 272, (1, 7))
    refs = build_references(model, [q], layers=[1, 2])
    plain = _routings(model, q)
    with c3po(model, refs, q, n_neighbors=1) as target:
        r = _routings(model, q)
    for l in (1, 2):
        assert torch.equal(r[l].expert_ids[-1].sort().values, plain[l].expert_ids[-1].sort().values)
        dense = torch.zeros(8).index_put_((plain[l].expert_ids[-1],), plain[l].weights[-1].float())
        torch.testing.assert_close(target[l], dense)
        got = torch.zeros(8).index_put_((r[l].expert_ids[-1],), r[l].weights[-1].float())
        torch.testing.assert_close(got, dense)


def test_c3po_replaces_critical_layers_last_token_by_neighbour_average(tiny_run):
    _, model = tiny_run
    torch.manual_seed(1)
    refs_q = [torch.randint(0, 272, (1, 6)) for _ in range(4)]
    refs = build_references(model, refs_q, layers=[2])
    q = torch.randint(0, 272, (1, 5))
    emb, _ = embed_and_route(model, q, [2])
    target = c3po_weights(refs, emb, n_neighbors=2, bandwidth=0.7)
    d = (refs.embeddings - emb).norm(dim=1)  # hand computation
    idx = d.argsort()[:2]
    kern = torch.exp(-d[idx] ** 2 / (2 * 0.7**2))
    expect = (kern[:, None] * refs.weights[2][idx]).sum(0) / kern.sum()
    torch.testing.assert_close(target[2], expect)
    plain = _routings(model, q)
    with remix(model, target):
        r = _routings(model, q)
    assert torch.equal(r[2].expert_ids[:-1], plain[2].expert_ids[:-1])  # only the last token changes
    w, e = expect.topk(2)
    assert set(r[2].expert_ids[-1].tolist()) == set(e.tolist())
    torch.testing.assert_close(r[2].weights[-1].sum(), plain[2].weights[-1].sum())
    assert torch.equal(r[1].expert_ids, plain[1].expert_ids)  # non-critical layers untouched


def test_c3po_bad_input(tiny_run):
    _, model = tiny_run
    refs = References(torch.zeros(2, 32), {1: torch.zeros(2, 8)})
    with pytest.raises(ValueError, match="n_neighbors"):
        c3po_weights(refs, torch.zeros(32), n_neighbors=0)
    with pytest.raises(ValueError, match="query embedding"):
        c3po_weights(refs, torch.zeros(5))
    with pytest.raises(ValueError, match="weights must be"):
        with remix(model, {1: torch.zeros(3)}):
            pass
    with pytest.raises(ValueError, match=r"References.weights\[1\]"):
        References(torch.zeros(2, 32), {1: torch.zeros(3, 8)})


def test_top_p_routing_hand_computed():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]))
    r = Routing(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.6, 0.4], [0.5, 0.5]]), logits, 3)
    out = top_p_routing(r, 0.3)
    assert top_p_routing(r, 0.5).expert_ids.tolist() == [[0, -1], [1, 0]]  # 0.4 < 0.5: both kept
    assert out.expert_ids.tolist() == [[0, -1], [-1, 0]]  # token 1: expert 0 has the larger probability
    assert out.weights.tolist() == [[1.0, 0.0], [0.0, 1.0]]
