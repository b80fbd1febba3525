"""Mixture-of-Depths blocks: a per-sequence slow reference, skipped tokens untouched, top-k counts, the causal
decision and its loss, KV-cached generation against the full forward, gradients, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.models import LMConfig, MoELM
from moekit.models.depth import DepthRouter, gather_selected
from moekit.routing import RoutingContext
from tests.helpers import TINY_LM

TINY = dict(TINY_LM, n_layers=4)


def tiny(**kw) -> MoELM:
    return MoELM(LMConfig(**{**TINY, "mod_capacity": 0.5, **kw}))


def reference_block(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, selected: torch.Tensor):
    """One routed block, sequence by sequence: its selected tokens through attention (causal among them, RoPE at
    their own positions) and the FFN, the update scaled by the gate; every other token unchanged."""
    out = x.clone()
    r = (x @ block.depth_router.weight.t()).squeeze(-1)
    gate = torch.sigmoid(r) if block.depth_router.gate == "sigmoid" else r
    for b in range(x.shape[0]):
        pos = selected[b].nonzero().squeeze(-1)
        if pos.numel() == 0:
            continue
        xs = x[b : b + 1, pos]  # [1, n, D]
        q, k, v = block.self_attn.qkv(block.input_layernorm(xs), cos[pos], sin[pos])
        a = block.self_attn.out(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        h = block.post_attention_layernorm(xs + a)
        y = block.mlp(h)
        y = y[0] if isinstance(y, tuple) else y  # an MoE returns (y, routing)
        out[b, pos] = x[b, pos] + gate[b, pos, None] * (a + y)[0]
    return out


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("selection", ["topk", "causal"])
def test_routed_block_matches_per_sequence_reference(moe, selection):
    torch.manual_seed(0)
    model = tiny(**({"num_experts": 4, "expert_hidden": 16} if moe else {}))
    block = model.layers[1]
    assert block.depth_router is not None and model.layers[0].depth_router is None
    x = torch.randn(3, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    out = block(x, cos, sin, None, RoutingContext(), selection)
    ref = reference_block(block, x, cos, sin, out.selected)
    torch.testing.assert_close(out.x, ref, atol=1e-5, rtol=1e-5)
    # tokens the block did not select pass exactly unchanged
    assert torch.equal(out.x[~out.selected], x[~out.selected])
    if selection == "topk":
        assert out.selected.sum(1).tolist() == [5, 5, 5]  # ceil(0.5 x 10) per sequence
        r = (x @ block.depth_router.weight.t()).squeeze(-1)
        assert torch.equal(out.selected, r >= r.topk(5, dim=1).values[:, -1:])  # the highest scores
    else:
        r = (x @ block.depth_router.weight.t()).squeeze(-1)
        assert torch.equal(out.selected, r > 0)  # sigmoid(r) > 1/2
        assert out.depth_aux is None


def test_capacity_tokens_and_gather_selected():
    router = DepthRouter(dim=8, capacity=0.125)
    assert [router.capacity_tokens(L) for L in (1, 8, 9, 16, 100)] == [1, 1, 2, 2, 13]
    sel = torch.tensor([[False, True, False, True], [True, False, False, False], [False] * 4])
    idx, valid, counts = gather_selected(sel)
    assert counts.tolist() == [2, 1, 0]
    assert idx[0].tolist() == [1, 3] and idx[1, 0] == 0
    assert valid.tolist() == [[True, True], [True, False], [False, False]]


def test_aux_loss_is_binary_cross_entropy_of_the_topk_targets():
    torch.manual_seed(1)
    router = DepthRouter(dim=16, capacity=0.25, aux_weight=0.5)
    x = torch.randn(2, 8, 16)
    selected, gate, aux = router(x, "topk")
    r = (x @ router.weight.t()).squeeze(-1)
    p = torch.sigmoid(r)
    t = selected.float()
    want = -(t * p.log() + (1 - t) * (1 - p).log()).mean() * 0.5
    torch.testing.assert_close(aux, want)
    torch.testing.assert_close(gate, p)
    assert selected.sum(1).tolist() == [2, 2]


def test_predictor_mode_trains_the_predictor_not_the_router():
    torch.manual_seed(2)
    router = DepthRouter(dim=16, capacity=0.5, causal="predictor")
    x = torch.randn(2, 6, 16, requires_grad=True)
    selected, _, aux = router(x, "topk")
    aux.backward()
    assert router.weight.grad is None  # the top-k targets come from the router; its scores get no aux gradient
    assert x.grad is None or float(x.grad.abs().sum()) == 0.0  # the predictor reads a detached input
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in router.predictor.parameters())
    causal, _, _ = router(x, "causal")
    assert torch.equal(causal, router.predictor(x).squeeze(-1) > 0)


def test_linear_gate_is_the_raw_router_score():
    router = DepthRouter(dim=8, capacity=0.5, gate="linear")
    x = torch.randn(1, 4, 8)
    _, gate, _ = router(x, "causal")
    torch.testing.assert_close(gate, (x @ router.weight.t()).squeeze(-1))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_experts": 4, "expert_hidden": 16},
        {"mod_causal": "predictor"},
        {"num_experts": 4, "expert_hidden": 16, "share_blocks": True},
    ],
)
def test_kv_cached_decoding_matches_the_full_causal_forward(kw):
    torch.manual_seed(3)
    model = tiny(**kw).eval()
    with torch.no_grad():  # push some router scores positive and some negative so sequences differ in counts
        for block in model.layers:
            if block.depth_router is not None:
                block.depth_router.weight.mul_(20)
    ids = torch.randint(0, 64, (3, 14))
    full = model(ids)
    counts = [d.sum(1).tolist() for d in full.depth if d is not None]
    assert any(len(set(c)) > 1 for c in counts), counts  # the sequences took different numbers of tokens
    cache = model.new_cache(3)
    chunks = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:7], cache=cache).logits]
    chunks += [model(ids[:, i : i + 1], cache=cache).logits for i in range(7, 14)]
    torch.testing.assert_close(torch.cat(chunks, 1), full.logits, atol=1e-5, rtol=1e-5)
    routed = [i for i, b in enumerate(model.layers) if b.depth_router is not None]
    for i, d in zip(routed, [d for d in full.depth if d is not None], strict=True):
        assert cache.depth_len[i].tolist() == d.sum(1).tolist()  # only processed tokens were cached
    gen = model.generate(ids[:, :5], 6)
    assert gen.shape == (3, 11) and torch.equal(gen[:, :5], ids[:, :5])


def test_causal_selection_is_causal_and_topk_is_not_required_to_be():
    torch.manual_seed(4)
    model = tiny().eval()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 64
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8])
    with pytest.raises(ValueError, match="not causal"):
        model(ids, cache=model.new_cache(2), depth_selection="topk")
    with pytest.raises(ValueError, match="depth_selection"):
        model(ids, depth_selection="all")


def test_training_uses_topk_and_every_parameter_learns():
    torch.manual_seed(5)
    model = tiny(num_experts=4, expert_hidden=16, mod_aux_weight=0.0).train()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, targets=ids)
    assert [None if d is None else d.sum(1).tolist() for d in out.depth] == [None, [6, 6], None, [6, 6]]
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name  # the router learns from the LM loss
    # the aux loss of the two routed blocks is part of aux_loss
    model.zero_grad()
    with_aux = tiny(num_experts=4, expert_hidden=16, mod_aux_weight=1.0).train()
    with_aux.load_state_dict(model.state_dict())
    out2 = with_aux(ids, targets=ids)
    assert float(out2.aux_loss.detach()) > float(out.aux_loss.detach()) + 0.5  # two BCE terms of about ln 2 each


def test_checkpoint_round_trip_keeps_the_depth_routers(tmp_path):
    cfg = LMConfig(**{**TINY, "mod_capacity": 0.25, "mod_causal": "predictor"})
    again = LMConfig.from_dict(cfg.to_dict())
    assert again == cfg
    a, b = MoELM(cfg), MoELM(again)
    b.load_state_dict(a.state_dict())
    assert any("depth_router.predictor" in k for k in a.state_dict())
    ids = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(a.eval()(ids).logits, b.eval()(ids).logits)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mod_capacity": 0.0}, "mod_capacity"),
        ({"mod_capacity": 1.5}, "mod_capacity"),
        ({"mod_capacity": 0.5, "mod_gate": "relu"}, "mod_gate"),
        ({"mod_capacity": 0.5, "mod_causal": "oracle"}, "mod_causal"),
        ({"mod_capacity": 0.5, "mod_every": 5}, "leaves none"),
        ({"mod_capacity": 0.5, "mod_aux_weight": -1.0}, "mod_aux_weight"),
        ({"mod_capacity": 0.5, "num_experts": 4, "router": "recurrent", "router_args": {"k": 2}}, "recurrent"),
        ({"mod_capacity": 0.5, "num_experts": 4, "router": "graph_of_tokens", "router_args": {"k": 2}}, "sequences"),
        ({"mod_capacity": 0.5, "num_experts": 4, "router": "smear", "router_args": {}}, "'smear' needs whole"),
        ({"mod_capacity": 0.5, "num_experts": 2, "experts": "hecto"}, "'hecto' needs whole sequences"),
        ({"mod_capacity": 0.5, "num_experts": 4, "experts": "smear"}, "'smear' needs whole sequences"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**{**TINY, **kw})


def test_config_asks_the_parts_not_their_names(monkeypatch):
    """What a mixture-of-depths block refuses comes from the classes' declarations (no name list)."""
    from moekit.layers.experts import Experts
    from moekit.routing import get_router

    kw = {**TINY, "mod_capacity": 0.5, "num_experts": 4}
    LMConfig(**kw)  # topk + ffn experts fit
    monkeypatch.setattr(get_router("topk"), "needs_previous", True)
    with pytest.raises(ValueError, match="'topk' needs the previous MoE layer's routing"):
        LMConfig(**kw)
    monkeypatch.setattr(get_router("topk"), "needs_previous", False)
    monkeypatch.setattr(Experts, "needs_full_sequence", True, raising=False)
    with pytest.raises(ValueError, match="'ffn' needs whole sequences"):
        LMConfig(**kw)


def test_off_by_default_and_every_block_routed_with_mod_every_1():
    assert not any(LMConfig(**TINY).is_depth_layer(i) for i in range(4))
    cfg = LMConfig(**{**TINY, "mod_capacity": 0.5, "mod_every": 1})
    assert all(cfg.is_depth_layer(i) for i in range(4))


# routers whose choice for a token depends on the rest of the batch (capacity, expert choice) or on a fresh random
# draw per call: they train and decode in a MoD model, but decoding need not reproduce the full forward
NOT_PER_TOKEN = {"switch", "expert_choice", "random", "stochastic"}


def _entries_with_mod():
    from moekit.bench.routers import ENTRIES
    from moekit.layers.variants import EXPERTS_VARIANTS
    from moekit.routing import get_router

    for name, e in ENTRIES.items():
        if e.router is None:
            continue  # dense
        router, experts = get_router(e.router), EXPERTS_VARIANTS.get(e.model.get("experts", "ffn"))
        if router.needs_full_sequence or router.needs_previous or getattr(experts, "needs_full_sequence", False):
            continue  # the parts a MoD block refuses (test_bad_config)
        yield name, e


@pytest.mark.parametrize("name", [n for n, _ in _entries_with_mod()])
def test_every_compatible_leaderboard_entry_runs_in_mixture_of_depths_blocks(name):
    from moekit.bench.routers import ENTRIES

    e = ENTRIES[name]
    kw = {
        **TINY,
        "n_layers": 2,
        "num_experts": 4,
        "expert_hidden": 16,
        "router": e.router,
        "router_args": dict(e.router_args),
        **e.model,
        "mod_capacity": 0.5,
    }
    if e.router == "smoe_dropout":
        kw["router_args"]["anneal_steps"] = 10
    if kw.get("experts") == "duo":
        kw["num_experts"] = 2
    if kw.get("experts") == "autonomy":
        kw["experts_args"], kw["router_args"]["rank"] = {"rank": 4}, 4
    torch.manual_seed(6)
    model = MoELM(LMConfig(**kw)).train()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    assert model.layers[1].depth_router.weight.grad is not None
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :5], cache=cache).logits] + [
            model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 12)
        ]
    assert torch.isfinite(full).all()
    if name not in NOT_PER_TOKEN:
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
