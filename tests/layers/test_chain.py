"""Chain-of-Experts: `MoE` with one router per iteration; iterations re-route on the previous output.
Capacity, the shared-expert gate, Hecto experts, checkpoints and tracing work as for a plain layer."""

import numpy as np
import torch

from moekit.analyze.table import Trace
from moekit.analyze.trace import capture
from moekit.layers import MLP, Experts, MoE
from moekit.layers.hecto import HectoExperts
from moekit.models import LMConfig, MoELM
from moekit.routing import build_router
from moekit.train.checkpoint import load_model, save_checkpoint

D, E = 16, 6
TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, num_experts=4,
            expert_hidden=16, router_args={"k": 1}, moe_iterations=2)


def test_one_iteration_equals_plain_moe():
    torch.manual_seed(0)
    router = build_router("topk", dim=D, num_experts=E, k=2)
    experts = Experts(num_experts=E, dim=D, hidden=8)
    x = torch.randn(2, 5, D)
    chain = MoE(router=[router], experts=experts)
    assert chain.iterations == 1 and chain.router is router and chain.routers == (router,)
    y_chain, r_chain = chain(x)
    y_moe, r_moe = MoE(router=router, experts=experts)(x)
    assert torch.equal(y_chain, y_moe) and torch.equal(r_chain.expert_ids, r_moe.expert_ids)


def test_two_iterations_match_a_hand_written_chain():
    torch.manual_seed(1)
    r1, r2 = (build_router("topk", dim=D, num_experts=E, k=1) for _ in range(2))
    experts = Experts(num_experts=E, dim=D, hidden=8)
    layer = MoE(router=[r1, r2], experts=experts)
    assert layer.iterations == 2 and layer.router is r1 and layer.routers == (r1, r2)
    x = torch.randn(7, D)
    y, routing = layer(x)
    h1 = x + experts(x, r1(x))
    h2 = h1 + experts(h1, r2(h1))  # the second router reads the first iteration's output
    torch.testing.assert_close(y, h2 - x)
    assert routing.expert_ids.shape == (7, 2) and torch.equal(routing.expert_ids[:, 1:], r2(h1).expert_ids)
    assert routing.meta["iteration_logits"].shape == (2, 7, E)
    assert set(routing.aux) == {"load_balance"}
    torch.testing.assert_close(routing.aux["load_balance"], r1(x).aux["load_balance"] + r2(h1).aux["load_balance"])
    (y.square().mean() + routing.total_aux()).backward()
    assert r1.weight.grad.abs().sum() > 0 and r2.weight.grad.abs().sum() > 0


def test_capacity_and_shared_gate_apply_to_every_iteration():
    torch.manual_seed(2)
    r1, r2 = (build_router("topk", dim=D, num_experts=E, k=2) for _ in range(2))
    experts = Experts(num_experts=E, dim=D, hidden=8)
    shared = MLP(dim=D, hidden=8)
    layer = MoE(router=[r1, r2], experts=experts, shared_experts=shared, shared_gate=True, capacity_factor=0.5)
    x = torch.randn(12, D)
    y, routing = layer(x)
    # by hand: each iteration's routing capped at ceil(0.5 * 12 * 2 / 6) = 2 slots per expert, the gated
    # shared expert added once on the layer input
    from moekit.routing.capacity import apply_capacity

    c1 = apply_capacity(r1(x), 0.5)
    h1 = x + experts(x, c1)
    c2 = apply_capacity(r2(h1), 0.5)
    h2 = h1 + experts(h1, c2)
    expected = (h2 - x) + torch.sigmoid(layer.shared_expert_gate(x)) * shared(x)
    torch.testing.assert_close(y, expected)
    assert int(routing.dropped) == int(c1.dropped) + int(c2.dropped) > 0
    assert int(routing.tokens_per_expert().max()) <= 4  # 2 per iteration


def test_lm_config_allows_capacity_shared_gate_and_hecto_with_iterations():
    cfg = LMConfig(**{**TINY, "capacity_factor": 1.0, "num_shared_experts": 1, "shared_gate": True})
    model = MoELM(cfg)
    mlp = model.layers[0].mlp
    assert isinstance(mlp, MoE) and mlp.iterations == 2 and mlp.capacity_factor == 1.0
    assert mlp.shared_expert_gate is not None
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, targets=ids)
    assert out.routings[0].expert_ids.shape == (16, 2) and out.routings[0].dropped is not None
    (out.loss + out.aux_loss).backward()
    assert mlp.shared_expert_gate.weight.grad is not None


def test_hecto_chain_decodes_like_the_full_forward():
    """Each iteration's GRU keeps its own cached state, so KV-cached decoding equals the full forward."""
    torch.manual_seed(3)
    model = MoELM(LMConfig(**{**TINY, "experts": "hecto", "num_experts": 2, "router_args": {"k": 2}})).eval()
    assert isinstance(model.layers[0].mlp.experts, HectoExperts)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, i : i + 1], cache=cache).logits
                                                         for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert sorted(cache.states) == [(0, "hecto_gru"), (0, "hecto_gru.1"), (1, "hecto_gru"), (1, "hecto_gru.1")]


def test_chain_checkpoints_keep_their_key_names(tmp_path):
    """Chain layers keep the `routers.{t}` names of moekit's former ChainMoE: old checkpoints load."""
    torch.manual_seed(4)
    model = MoELM(LMConfig(**TINY)).eval()
    keys = set(model.state_dict())
    assert {"layers.0.mlp.routers.0.weight", "layers.0.mlp.routers.1.weight"} <= keys
    assert not any(".mlp.router." in k for k in keys)
    save_checkpoint(tmp_path, model, {"model": model.config.to_dict()})
    ids = torch.randint(0, 64, (2, 8))
    assert torch.equal(load_model(tmp_path).eval()(ids).logits, model(ids).logits)


def test_chain_layer_config_round_trips():
    torch.manual_seed(5)
    layer = MoE(router=[build_router("topk", dim=D, num_experts=E, k=1) for _ in range(3)],
                experts=Experts(num_experts=E, dim=D, hidden=8), inner_residual=False)
    clone = MoE.from_config(layer.config())
    assert clone.iterations == 3 and not clone.inner_residual and clone.config() == layer.config()
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(4, D)
    assert torch.equal(clone(x)[0], layer(x)[0])


def test_analyze_traces_a_chain_model(tmp_path):
    torch.manual_seed(6)
    model = MoELM(LMConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 64, (2, 8), generator=g)
    info = capture(model, [(batch, {"label": ["a", "b"]})], tmp_path / "t.parquet", progress=False)
    assert info.layers == [0, 1] and info.rows == 2 * 16 * 2  # layers x tokens x (2 iterations x top-1)
    tr = Trace(info.path)
    with torch.no_grad():
        out = model(batch)
    for layer in (0, 1):
        np.testing.assert_array_equal(tr.layer(layer).experts, out.routings[layer].expert_ids.numpy())
    # expert outputs are not recomputed for chain layers (iteration t's input is not the layer input): NaN
    info = capture(model, [(batch, {"label": ["a", "b"]})], tmp_path / "o.parquet", progress=False, record_outputs=True)
    assert Trace(info.path).sql("SELECT count(*) FROM trace WHERE NOT isnan(out_absmax)").fetchone()[0] == 0
