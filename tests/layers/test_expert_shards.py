"""The expert-parallel seam: a layer that holds experts [offset, offset + E_local) computes only those,
the parts of shards covering all E sum to the whole layer (outputs and gradients, every backend), and
the three stages of the sorted backends (gather -> compute -> combine) take an exchange of rows between
ranks, simulated here in one process."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import Experts, list_backends
from moekit.layers.dispatch import combine, gather, grouped_compute, loop_compute, plan
from moekit.layers.fused_mlp import fused_expert_mlp
from moekit.routing import Routing
from tests.layers.test_dispatch import random_routing


def forward_backward(layers: list[Experts], x: torch.Tensor, routing: Routing, backend: str, dtype=torch.float32):
    """Sum of the layers' outputs on (x, routing), and the gradients of a fixed random projection of it:
    (y, grad x, grad routing weights, {layer index: {parameter: grad}})."""
    for m in layers:
        m.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).requires_grad_(True)
    w = routing.weights.detach().requires_grad_(True)
    r = Routing(routing.expert_ids, w, routing.logits, routing.num_experts)
    y = sum(m(x, r, backend=backend) for m in layers)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * g).sum().backward()
    grads = {i: {n: p.grad for n, p in m.named_parameters()} for i, m in enumerate(layers)}
    return y.detach(), x.grad, w.grad, grads


def split(full: Experts, bounds: list[int]) -> list[Experts]:
    """Shards of `full` holding experts [bounds[i], bounds[i + 1])."""
    return [full.shard(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu_tanh")])
@pytest.mark.parametrize("T,E,k,empty", [(37, 8, 2, 0.0), (29, 6, 3, 0.2), (5, 4, 4, 0.0)])
def test_two_shards_sum_to_the_whole_layer(backend, gated, act, T, E, k, empty):
    torch.manual_seed(0)
    full = Experts(num_experts=E, dim=16, hidden=13, gated=gated, activation=act)
    shards = split(full, [0, E // 2, E])
    assert [(s.expert_offset, s.num_local_experts) for s in shards] == [(0, E // 2), (E // 2, E - E // 2)]
    x, routing = torch.randn(T, 16), random_routing(T, E, k, empty_frac=empty)
    want, got = forward_backward([full], x, routing, backend), forward_backward(shards, x, routing, backend)
    for a, b, what in zip(got[:3], want[:3], ("y", "grad x", "grad weights"), strict=True):
        torch.testing.assert_close(a, b, msg=what)
    for name, g in want[3][0].items():  # each shard's weight gradients are the whole layer's rows of its experts
        torch.testing.assert_close(torch.cat([got[3][0][name], got[3][1][name]]), g, msg=name)


@pytest.mark.parametrize("backend", list_backends())
def test_uneven_shards_in_bfloat16(backend):
    torch.manual_seed(0)
    full = Experts(num_experts=7, dim=16, hidden=24).to(torch.bfloat16)
    x, routing = torch.randn(25, 16), random_routing(25, 7, 3, empty_frac=0.1)
    want = forward_backward([full], x, routing, backend, torch.bfloat16)
    got = forward_backward(split(full, [0, 1, 4, 7]), x, routing, backend, torch.bfloat16)
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for name, g in want[3][0].items():
        torch.testing.assert_close(torch.cat([got[3][i][name] for i in range(3)]), g, **tol, msg=name)


@pytest.mark.parametrize("backend", list_backends())
def test_a_shard_computes_only_its_experts(backend):
    """Tokens routed only to experts outside the shard: zero output, no gradient into its weights; the
    other shard alone gives the whole layer's output."""
    torch.manual_seed(0)
    full = Experts(num_experts=6, dim=8, hidden=8)
    low, high = split(full, [0, 3, 6])
    x = torch.randn(10, 8)
    routing = random_routing(10, 6, 2)
    ids = routing.expert_ids % 3  # experts 0..2 only (a token may repeat an expert: fine for the check)
    routing = Routing(ids, routing.weights, routing.logits, 6)
    with torch.no_grad():
        assert torch.count_nonzero(high(x, routing, backend=backend)) == 0
        torch.testing.assert_close(low(x, routing, backend=backend), full(x, routing, backend=backend))
    got = forward_backward([low, high], x, routing, backend)
    for g in got[3][1].values():
        assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", list_backends())
def test_shard_without_any_token(backend):
    shard = Experts(num_experts=4, dim=8, hidden=5, num_local_experts=2, expert_offset=2)
    empty = random_routing(0, 4, 2)
    assert shard(torch.randn(0, 8), empty, backend=backend).shape == (0, 8)
    dropped = random_routing(6, 4, 2, empty_frac=1.0)
    assert torch.count_nonzero(shard(torch.randn(6, 8), dropped, backend=backend)) == 0


def test_plan_of_a_slice_is_the_slice_of_the_whole_plan():
    torch.manual_seed(0)
    ids = random_routing(50, 8, 3, empty_frac=0.2).expert_ids
    whole = plan(ids, 8)
    starts = [0]
    for c in whole.counts:
        starts.append(starts[-1] + c)
    for offset, n in [(0, 8), (0, 3), (3, 5), (7, 1), (2, 4)]:
        part = plan(ids, 8, offset=offset, num_local=n)
        a, b = starts[offset], starts[offset + n]
        assert part.offset == offset and part.counts == whole.counts[offset : offset + n]
        assert torch.equal(part.order, whole.order[a:b]) and torch.equal(part.token, whole.token[a:b])
    assert plan(ids, 8, offset=5).counts == whole.counts[5:]


@pytest.mark.parametrize("compute", [loop_compute, grouped_compute])
def test_simulated_all_to_all_between_gather_and_compute_equals_the_whole_layer(compute):
    """Two ranks, each with its own tokens and half the experts: each plans over all E and gathers, the
    rows of each expert go to the rank that holds it (grouped by local expert, then source rank), the
    compute stage runs there, outputs come back, each rank combines. Same outputs and gradients as one
    process with the whole layer."""
    torch.manual_seed(0)
    E, D, k = 6, 16, 2
    full = Experts(num_experts=E, dim=D, hidden=13)
    shards = split(full, [0, 3, 6])
    xs_in = [torch.randn(T, D, requires_grad=True) for T in (21, 14)]
    routings = [random_routing(T, E, k, empty_frac=0.1) for T in (21, 14)]
    plans = [plan(r.expert_ids, E) for r in routings]
    rows = [gather(x, p) for x, p in zip(xs_in, plans, strict=True)]  # per rank [N_r, D], sorted by expert

    # the exchange: segment (source rank r, expert e) of rows[r] -> holder of e, ordered by (e, r)
    def segments(p):
        out, start = [], 0
        for c in p.counts:
            out.append((start, start + c))
            start += c
        return out

    segs = [segments(p) for p in plans]
    outs = [[None] * E for _ in plans]  # outs[r][e]: outputs of rank r's rows of expert e
    for shard in shards:
        lo, n = shard.expert_offset, shard.num_local_experts
        parts = [(r, e) for e in range(lo, lo + n) for r in range(len(plans))]
        received = torch.cat([rows[r][slice(*segs[r][e])] for r, e in parts])
        counts = [sum(plans[r].counts[e] for r in range(len(plans))) for e in range(lo, lo + n)]
        W1, W2 = shard.gate_up_proj, shard.down_proj
        ys = compute(received, counts, W1, W2, shard)
        start = 0
        for r, e in parts:  # ... and back
            c = plans[r].counts[e]
            outs[r][e], start = ys[start : start + c], start + c
    got = [combine(torch.cat(outs[r]), plans[r], routings[r].weights, xs_in[r].shape[0]) for r in range(2)]
    g = [torch.randn_like(y) for y in got]
    sum((y * gy).sum() for y, gy in zip(got, g, strict=True)).backward()

    xs_ref = [x.detach().clone().requires_grad_(True) for x in xs_in]
    want = [full(x, r, backend="loop") for x, r in zip(xs_ref, routings, strict=True)]
    sum((y * gy).sum() for y, gy in zip(want, g, strict=True)).backward()
    for a, b, xa, xb in zip(got, want, xs_in, xs_ref, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(xa.grad, xb.grad)
    for name, gw in full.named_parameters():
        torch.testing.assert_close(torch.cat([getattr(s, name).grad for s in shards]), gw.grad, msg=name)


@pytest.mark.parametrize("kw,match", [
    (dict(expert_offset=3, num_local_experts=2), r"must lie in \[0, 4\).*expert_offset=3, num_local_experts=2"),
    (dict(expert_offset=-1, num_local_experts=2), r"expert_offset=-1"),
    (dict(num_local_experts=0), r"at least one expert, got expert_offset=0, num_local_experts=0"),
    (dict(expert_offset=4), r"expert_offset=4, num_local_experts=0"),
    (dict(num_local_experts=5), r"num_local_experts=5"),
    (dict(expert_offset=1.0, num_local_experts=2), r"expert_offset must be an integer, got 1.0"),
    (dict(num_local_experts=True), r"num_local_experts must be an integer, got True"),
])
def test_bad_slices_are_rejected(kw, match):
    with pytest.raises(ValueError, match=rf"Experts: .*{match}"):
        Experts(num_experts=4, dim=8, hidden=8, **kw)


def test_bad_shard_and_plan_requests_are_rejected():
    half = Experts(num_experts=8, dim=8, hidden=8).shard(4, 4)
    with pytest.raises(ValueError, match=r"Experts.shard: experts \[2, 6\) are not all held by this layer, "
                                         r"which holds \[4, 8\)"):
        half.shard(2, 4)
    with pytest.raises(ValueError, match=r"Experts.shard: .*expert_offset=6, num_local_experts=4"):
        half.shard(6, 4)
    ids = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match=r"plan: .*expert_offset=3, num_local_experts=2"):
        plan(ids, 4, offset=3, num_local=2)
    with pytest.raises(ValueError, match=r"expert ids must be in \[-1, 4\), found 4"):
        plan(torch.tensor([[4]]), 4, offset=2)


def test_compute_stage_checks_counts_against_the_weights():
    experts = Experts(num_experts=4, dim=8, hidden=8)
    W1, W2 = experts.gate_up_proj, experts.down_proj
    with pytest.raises(ValueError, match="counts has 3 entries but the weights hold 4 experts"):
        fused_expert_mlp(torch.randn(5, 8), W1, W2, [1, 2, 2], "silu", True)
    with pytest.raises(ValueError, match="grouped_compute: counts has 5 entries but the weights hold 4 experts"):
        grouped_compute(torch.randn(5, 8), [1, 1, 1, 1, 1], W1, W2, experts)
    with pytest.raises(ValueError, match="counts sum to 4 but x has 5 rows"):
        loop_compute(torch.randn(5, 8), [1, 1, 1, 1], W1, W2, experts)


def test_sharded_config_round_trip_and_whole_layer_config_unchanged():
    full = Experts(num_experts=6, dim=8, hidden=5, gated=False, activation="relu")
    assert "num_local_experts" not in full.config() and "expert_offset" not in full.config()
    assert not full.sharded and full.num_local_experts == 6 and full.expert_offset == 0
    shard = full.shard(2, 3)
    cfg = shard.config()
    assert cfg["num_local_experts"] == 3 and cfg["expert_offset"] == 2 and cfg["num_experts"] == 6
    again = Experts(**cfg)
    assert again.config() == cfg and again.sharded
    assert again.up_proj.shape == (3, 5, 8) and again.down_proj.shape == (3, 8, 5)
    again.load_state_dict(shard.state_dict())
    torch.testing.assert_close(again.up_proj, full.up_proj[2:5])
    assert "num_local_experts=3, expert_offset=2" in repr(again)
    assert shard.up_proj.data_ptr() != full.up_proj.data_ptr()  # a copy: training a shard leaves the whole


def test_replacing_the_weights_and_num_experts_keeps_a_whole_layer_whole():
    """What pruning code does today (tests/hf/test_routing.py): E_local follows the weights."""
    experts = Experts(num_experts=8, dim=8, hidden=8)
    keep = torch.tensor([0, 2, 3, 5, 6, 7])
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data[keep].clone())
    experts.down_proj = torch.nn.Parameter(experts.down_proj.data[keep].clone())
    experts.num_experts = 6
    assert experts.num_local_experts == 6 and not experts.sharded and "expert_offset" not in experts.config()
    routing = random_routing(9, 6, 2)
    assert experts(torch.randn(9, 8), routing, backend="loop").shape == (9, 8)
