"""Hecto heterogeneous experts (GRU + FFN): against a per-token loop with explicit GRU cell math."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moekit.layers import MoE
from moekit.layers.hecto import HectoExperts
from moekit.layers.variants import build_experts
from moekit.models import LMConfig, MoELM
from moekit.routing import Routing, build_router
from tests.helpers import tiny_lm

D, F = 16, 8


def routing(ids: torch.Tensor, w: torch.Tensor | None = None) -> Routing:
    if w is None:
        w = torch.rand(ids.shape) + 0.1
    w = w * (ids >= 0)
    return Routing(ids, w, torch.zeros(ids.shape[0], 2), 2)


def gru_cell(ex: HectoExperts, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One GRU step written out (PyTorch's equations, gates r, z, n): x [D], h [H] -> [H]."""
    g = ex.gru
    W_ir, W_iz, W_in = g.weight_ih_l0.chunk(3)
    W_hr, W_hz, W_hn = g.weight_hh_l0.chunk(3)
    b_ir, b_iz, b_in = g.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = g.bias_hh_l0.chunk(3)
    r = torch.sigmoid(W_ir @ x + b_ir + W_hr @ h + b_hr)
    z = torch.sigmoid(W_iz @ x + b_iz + W_hz @ h + b_hz)
    n = torch.tanh(W_in @ x + b_in + r * (W_hn @ h + b_hn))
    return (1 - z) * n + z * h


def ffn_ref(ex: HectoExperts, x: torch.Tensor) -> torch.Tensor:
    """The FFN expert on one token x [D] -> [D]."""
    Fw = ex.hidden
    gate, up = ex.ffn_gate_up[:Fw] @ x, ex.ffn_gate_up[Fw:] @ x
    return ex.ffn_down @ (torch.nn.functional.silu(gate) * up)


def reference(ex: HectoExperts, x, r: Routing, seq_len: int, h0=None):
    """Loop over sequences and tokens: the GRU steps only on tokens with a slot routed to it.
    Returns (y [T, D], final GRU state [B, H])."""
    T, k = r.expert_ids.shape
    B, H = T // seq_len, ex.gru_width
    rows, finals = [], []
    for b in range(B):
        h = torch.zeros(H) if h0 is None else h0[b]
        for t in range(seq_len):
            i = b * seq_len + t
            ids = [int(e) for e in r.expert_ids[i]]
            if 1 in ids:
                h = gru_cell(ex, x[i], h)
            y = torch.zeros(D)
            for s in range(k):
                if ids[s] == 0:
                    y = y + r.weights[i, s] * ffn_ref(ex, x[i])
                elif ids[s] == 1:
                    y = y + r.weights[i, s] * (ex.gru_out @ h)
            rows.append(y)
        finals.append(h)
    return torch.stack(rows), torch.stack(finals)


def make_ids(B: int, L: int, k: int) -> torch.Tensor:
    """Random ids over {-1, 0, 1} in k slots (no repeated expert in a token); sequence 1 has no GRU token."""
    if k == 1:
        ids = torch.tensor([[-1], [0], [0], [1], [1], [1]])[torch.randint(0, 6, (B * L,))]
    else:
        choices = torch.tensor([[0, 1], [1, 0], [1, -1], [0, -1], [-1, -1], [-1, 1]])
        ids = choices[torch.randint(0, len(choices), (B * L,))]
    ids = ids.view(B, L, k)
    ids[1][ids[1] == 1] = 0
    ids[0, 0] = torch.tensor([-1] * k)  # an empty token
    return ids.view(B * L, k)


@pytest.mark.parametrize(("k", "gru_hidden"), [(1, None), (2, None), (2, 12)])
def test_matches_per_token_reference_with_gradients(k, gru_hidden):
    B, L = 3, 7
    ex = HectoExperts(dim=D, hidden=F, gru_hidden=gru_hidden)
    assert ex.gru_width == (gru_hidden or D) and ex.gru_out.shape == (D, ex.gru_width)
    ids = make_ids(B, L, k)
    assert (ids == 0).any() and (ids == 1).any() and (ids == -1).any()
    x = torch.randn(B * L, D, requires_grad=True)
    w = (torch.rand(B * L, k) + 0.1).requires_grad_()
    r = Routing(ids, w * (ids >= 0), torch.zeros(B * L, 2), 2)
    y = ex(x, r, seq_len=L)
    ref, _ = reference(ex, x, r, L)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (y[0] == 0).all()  # the empty token gets nothing
    # gradients: the same for the input, the routing weights and every parameter
    g = torch.randn_like(y)
    leaves = [x, w, *ex.parameters()]
    gf = torch.autograd.grad((y * g).sum(), leaves, retain_graph=True)
    gs = torch.autograd.grad((ref * g).sum(), leaves)
    for (name, _), a, b in zip([("x", 0), ("w", 0), *ex.named_parameters()], gf, gs, strict=True):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_causal_per_sequence():
    B, L, t = 2, 9, 4
    ex = HectoExperts(dim=D, hidden=F)
    ids = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1] * B).view(-1, 1)
    r = routing(ids)
    x = torch.randn(B * L, D)
    x2 = x.view(B, L, D).clone()
    x2[:, t + 1 :] = torch.randn(B, L - t - 1, D)
    y, y2 = ex(x, r, seq_len=L).view(B, L, D), ex(x2.view(-1, D), r, seq_len=L).view(B, L, D)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])
    # sequences are independent: changing sequence 1 leaves sequence 0 alone
    x3 = x.view(B, L, D).clone()
    x3[1] = torch.randn(L, D)
    assert torch.equal(ex(x3.view(-1, D), r, seq_len=L).view(B, L, D)[0], y[0])


def test_each_expert_sees_only_its_tokens():
    L = 8
    ex = HectoExperts(dim=D, hidden=F)
    ids = torch.tensor([[1], [0], [1], [0], [0], [1], [-1], [1]])
    gru_pos, ffn_pos = [0, 2, 5, 7], [1, 3, 4]
    r = routing(ids)
    x = torch.randn(L, D)
    y = ex(x, r, seq_len=L)
    # an FFN token changes: only its own output moves; the GRU never saw it
    x2 = x.clone()
    x2[3] = torch.randn(D)
    y2 = ex(x2, r, seq_len=L)
    others = [i for i in range(L) if i != 3]
    assert torch.equal(y2[others], y[others]) and not torch.allclose(y2[3], y[3])
    # a GRU token changes: the later GRU tokens move (the state carries it), nothing else does
    x3 = x.clone()
    x3[2] = torch.randn(D)
    y3 = ex(x3, r, seq_len=L)
    for i in (2, 5, 7):
        assert not torch.allclose(y3[i], y[i]), i
    assert torch.equal(y3[[0, *ffn_pos, 6]], y[[0, *ffn_pos, 6]])
    # the GRU outputs are those of an nn.GRU run on the routed subsequence alone (weights 1 here)
    r1 = routing(ids, torch.ones(L, 1))
    hs, _ = ex.gru(x[gru_pos].unsqueeze(0))
    torch.testing.assert_close(ex(x, r1, seq_len=L)[gru_pos], hs[0] @ ex.gru_out.t())


def test_cache_carries_the_gru_state_across_chunks():
    B, L, layer = 3, 10, 3
    ex = HectoExperts(dim=D, hidden=F, gru_hidden=12)
    ids = make_ids(B, L, 1)
    ids.view(B, L)[0, 4] = 0  # the one-token chunk at position 4 has no GRU token in sequence 0
    ids.view(B, L)[2, 4] = 1
    x = torch.randn(B, L, D)
    w = torch.rand(B, L, 1) + 0.1
    full = ex(x.view(-1, D), routing(ids, w.view(-1, 1)), seq_len=L).view(B, L, D)
    cache = SimpleNamespace(states={})
    outs, start = [], 0
    for n in (4, 1, 3, 2):
        sl = slice(start, start + n)
        before = cache.states.get((layer, "hecto_gru"))
        r = routing(ids.view(B, L, 1)[:, sl].reshape(-1, 1), w[:, sl].reshape(-1, 1))
        outs.append(ex(x[:, sl].reshape(-1, D), r, seq_len=n, cache=cache, layer=layer).view(B, n, D))
        if n == 1:  # sequence 0 had no GRU token in this chunk: its state is unchanged, sequence 2's moved
            assert torch.equal(cache.states[(layer, "hecto_gru")][0], before[0])
            assert not torch.allclose(cache.states[(layer, "hecto_gru")][2], before[2])
        start += n
    assert list(cache.states) == [(layer, "hecto_gru")]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-6)
    _, h_final = reference(ex, x.view(-1, D), routing(ids, w.view(-1, 1)), L)
    torch.testing.assert_close(cache.states[(layer, "hecto_gru")], h_final, rtol=1e-5, atol=1e-6)
    # a chunk with no GRU token at all leaves the state as it was
    h = cache.states[(layer, "hecto_gru")]
    ex(torch.randn(B, D), routing(torch.zeros(B, 1, dtype=torch.long)), seq_len=1, cache=cache, layer=layer)
    assert cache.states[(layer, "hecto_gru")] is h


def test_moe_layer_passes_sequences():
    B, L = 2, 6
    ex = HectoExperts(dim=D, hidden=F)
    moe = MoE(router=build_router("topk", dim=D, num_experts=2, k=1), experts=ex)
    x = torch.randn(B, L, D)
    y, r = moe(x)
    flat = x.view(-1, D)
    torch.testing.assert_close(y.view(-1, D), ex(flat, r, seq_len=L))
    # a [T, D] input is one sequence: the GRU state crosses from sequence 0 into sequence 1
    y1, r1 = moe(flat)
    assert torch.equal(r1.expert_ids, r.expert_ids) and (r.expert_ids.view(B, L) == 1).any(dim=1).all()
    torch.testing.assert_close(y1, ex(flat, r1))
    torch.testing.assert_close(y1[:L], y[0])
    assert not torch.allclose(y1[L:], y[1])
    cache = SimpleNamespace(states={})
    moe(x, cache=cache, layer=0)
    assert cache.states[(0, "hecto_gru")].shape == (B, D)


def test_lm_prefill_and_decode_equal_full_forward():
    cfg = tiny_lm(num_experts=2, expert_hidden=32, experts="hecto", router="topk", router_args={"k": 1})
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    model = MoELM(cfg).eval()
    assert isinstance(model.layers[0].mlp.experts, HectoExperts)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids)
        routed = torch.cat([r.expert_ids for r in full.routings])
        assert (routed == 0).any() and (routed == 1).any()  # both experts are in use
        cache = model.new_cache(2)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=0, atol=1e-5)
    assert sorted(cache.states) == [(0, "hecto_gru"), (1, "hecto_gru")]
    # generate (KV-cached, greedy) gives the tokens of greedy decoding by full forwards
    out = model.generate(ids[:, :5], 4)
    assert out.shape == (2, 9)
    seq = ids[:, :5]
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    # trains: every parameter of the experts gets a gradient
    model.train()
    o = model(ids, targets=ids)
    (o.loss + o.aux_loss).backward()
    for n, p in model.layers[0].mlp.experts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_config_and_bad_input():
    ex = build_experts("hecto", num_experts=2, dim=D, hidden=F, gru_hidden=4)
    assert isinstance(ex, HectoExperts) and ex.needs_full_sequence
    expected = {"num_experts": 2, "dim": D, "hidden": F, "activation": "silu", "gru_hidden": 4}
    assert ex.config() == expected and HectoExperts(**expected).config() == expected
    with pytest.raises(ValueError, match="must be 2"):
        HectoExperts(num_experts=3, dim=D, hidden=F)
    for bad in ({"dim": 0}, {"hidden": -1}, {"gru_hidden": 0}, {"gru_hidden": 2.0}):
        with pytest.raises(ValueError, match="positive integer"):
            HectoExperts(**{"dim": D, "hidden": F, **bad})
    r = routing(torch.zeros(10, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="whole number of sequences"):
        ex(torch.randn(10, D), r, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        ex(torch.randn(10, D), r, seq_len=0)
    with pytest.raises(ValueError, match=r"expected input \[T, 16\]"):
        ex(torch.randn(10, D + 1), r)
    with pytest.raises(ValueError, match="covers 10 tokens"):
        ex(torch.randn(8, D), r)
    with pytest.raises(ValueError, match="layer"):
        ex(torch.randn(10, D), r, cache=SimpleNamespace(states={}))
    stale = SimpleNamespace(states={(0, "hecto_gru"): torch.zeros(3, 4)})  # 3 sequences, the input has 2
    with pytest.raises(ValueError, match="cached GRU state"):
        ex(torch.randn(10, D), r, seq_len=5, cache=stale, layer=0)
