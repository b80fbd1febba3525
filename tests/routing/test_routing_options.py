"""The shared router options of `moekit.routing.base.Router`: routed-output scaling (`routed_scale`) and
DeepSeek-V3's auxiliary-loss-free selection bias (`selection_bias`, `bias_update_rate`)."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.layers import Experts, MoE
from moekit.routing import build_router, router_config, router_from_config

D, E = 16, 8
SCALED = {"topk": {"k": 2}, "switch": {"k": 2, "capacity_factor": None}, "null_experts": {"k": 2, "num_null": 2}}
BIASED = {"topk": {"k": 2}, "switch": {"k": 2, "capacity_factor": None}}


def moe(name: str, **args) -> MoE:
    torch.manual_seed(0)
    router = build_router(name, dim=D, num_experts=E, **args)
    return MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=24))


@pytest.mark.parametrize("name", sorted(SCALED))
@pytest.mark.parametrize("scale", [2.0, 0.5, 4])
def test_routed_scale_multiplies_the_layer_output_exactly(name, scale):
    base, scaled = moe(name, **SCALED[name]).eval(), moe(name, **SCALED[name], routed_scale=scale).eval()
    scaled.load_state_dict(base.state_dict())
    x = torch.randn(3, 7, D)
    (y1, r1), (ys, rs) = base(x), scaled(x)
    assert torch.equal(rs.expert_ids, r1.expert_ids)
    assert torch.equal(rs.weights, r1.weights * scale)
    assert torch.equal(ys, y1 * scale)  # powers of two: exact in float32


def test_topk_weights_sum_to_k():
    router = build_router("topk", dim=D, num_experts=E, k=4, routed_scale=4.0).eval()
    torch.testing.assert_close(router(torch.randn(10, D)).weights.sum(-1), torch.full((10,), 4.0))


@pytest.mark.parametrize("name", sorted(SCALED))
def test_default_routed_scale_leaves_weights_untouched(name):
    router = build_router(name, dim=D, num_experts=E, **SCALED[name]).eval()
    assert router.routed_scale == 1.0 and not router.has_selection_bias
    w = torch.randn(5, 2)
    assert router.scale_weights(w) is w
    assert "e_score_correction_bias" not in router.state_dict()  # checkpoints of default routers unchanged


@pytest.mark.parametrize("name", sorted(SCALED))
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "2"])
def test_bad_routed_scale_is_refused(name, bad):
    with pytest.raises(ValueError, match=r"routed_scale must be a finite number > 0, got"):
        build_router(name, dim=D, num_experts=E, **SCALED[name], routed_scale=bad)


@pytest.mark.parametrize("args,match", [
    ({"selection_bias": 1}, "selection_bias must be True or False, got 1"),
    ({"selection_bias": True, "bias_update_rate": -0.1}, "bias_update_rate must be a finite number >= 0"),
    ({"selection_bias": True, "bias_update_rate": float("nan")}, "bias_update_rate"),
])
def test_bad_selection_bias_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        build_router("topk", dim=D, num_experts=E, **args)


def test_null_experts_has_no_selection_bias():
    with pytest.raises(TypeError, match="selection_bias"):
        build_router("null_experts", dim=D, num_experts=E, selection_bias=True)


@pytest.mark.parametrize("name", sorted(BIASED))
def test_config_and_checkpoint_round_trip(name):
    router = build_router(name, dim=D, num_experts=E, **BIASED[name], routed_scale=2.0, selection_bias=True,
                          bias_update_rate=0.02)
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.5, 0.5)
    cfg = json.loads(json.dumps(router_config(router)))
    assert cfg["args"]["routed_scale"] == 2.0 and cfg["args"]["selection_bias"] is True
    assert cfg["args"]["bias_update_rate"] == 0.02
    clone = router_from_config(cfg)
    clone.load_state_dict(router.state_dict())  # strict: the bias buffer is saved and expected
    x = torch.randn(12, D)
    a, b = router.eval()(x), clone.eval()(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("order", ["softmax_topk", "topk_softmax"])
def test_topk_bias_changes_selection_only(order):
    torch.manual_seed(1)
    router = build_router("topk", dim=D, num_experts=E, k=2, order=order, normalize=False,
                          selection_bias=True).eval()
    x = torch.randn(30, D)
    before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0  # expert 5 now always wins selection
    after = router(x)
    assert (after.expert_ids == 5).any(dim=-1).all() and not torch.equal(before.expert_ids, after.expert_ids)
    logits = x @ router.weight.t()
    if order == "softmax_topk":  # weights: the unbiased probabilities of whichever experts were chosen
        expected = torch.softmax(logits, -1).gather(1, after.expert_ids)
    else:  # softmax over the unbiased logits of the chosen experts
        expected = torch.softmax(logits.gather(1, after.expert_ids), -1)
    torch.testing.assert_close(after.weights, expected)


def test_switch_bias_changes_selection_only():
    torch.manual_seed(2)
    router = build_router("switch", dim=D, num_experts=E, k=1, capacity_factor=None, selection_bias=True).eval()
    x = torch.randn(30, D)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0
    r = router(x)
    assert (r.expert_ids == 3).all()
    torch.testing.assert_close(r.weights[:, 0], torch.softmax(x @ router.weight.t(), -1)[:, 3])


@pytest.mark.parametrize("name,args", [
    ("deepseek", {"k": 2}),
    ("topk", {"k": 2, "selection_bias": True}),
    ("topk", {"k": 2, "selection_bias": True, "order": "topk_softmax"}),
    ("switch", {"k": 1, "capacity_factor": None, "selection_bias": True}),
])
def test_selection_bias_update_moves_load_toward_balance(name, args):
    torch.manual_seed(5)
    router = build_router(name, dim=D, num_experts=E, bias_update_rate=0.01, **args)
    with torch.no_grad():
        router.weight[0, 0] += 2.0  # inputs with x[:, 0] > 0 all favour expert 0: it is overloaded
    x = torch.randn(128, D).abs()
    r = router.eval()(x)
    assert torch.equal(router.e_score_correction_bias, torch.zeros(E))  # eval: no update
    load = r.tokens_per_expert().float()
    router.train()(x)
    b = router.e_score_correction_bias
    over, under = load > load.mean(), load < load.mean()
    assert over.any() and under.any()
    assert torch.equal(b[over], torch.full_like(b[over], -0.01))
    assert torch.equal(b[under], torch.full_like(b[under], 0.01))
    for _ in range(50):
        router(x)
    before, after = r.stats()["max_over_mean_load"], router.eval()(x).stats()["max_over_mean_load"]
    assert before > 1.5 and after < 0.75 * before


def test_without_selection_bias_training_leaves_state_unchanged():
    router = build_router("topk", dim=D, num_experts=E, bias_update_rate=0.5).train()
    router(torch.randn(10, D))
    assert not router.has_selection_bias and dict(router.named_buffers()) == {}


def test_bias_stays_float32_when_cast():
    router = build_router("topk", dim=D, num_experts=E, selection_bias=True).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.e_score_correction_bias.dtype == torch.float32
    r = router.train()(torch.randn(6, D, dtype=torch.bfloat16))
    assert r.weights.dtype == torch.bfloat16


def test_update_ignores_empty_slots():
    router = build_router("topk", dim=D, num_experts=4, selection_bias=True, bias_update_rate=1.0)
    router.update_bias(torch.tensor([[0, -1], [0, 1], [2, -1]]))  # loads 2, 1, 1, 0; mean 1
    assert router.e_score_correction_bias.tolist() == [-1.0, 0.0, 0.0, 1.0]
