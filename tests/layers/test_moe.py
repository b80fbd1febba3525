"""The MoE layer: composition, shared experts, capacity, batch independence, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.layers import MLP, Experts, MoE
from moekit.routing import build_router

D, E, F = 16, 8, 24


def layer(**kw) -> MoE:
    return MoE(
        router=build_router("topk", dim=D, num_experts=E, k=2),
        experts=Experts(num_experts=E, dim=D, hidden=F),
        **kw,
    )


def test_output_equals_router_plus_experts():
    moe = layer()
    x = torch.randn(2, 5, D)
    y, r = moe(x)
    assert y.shape == x.shape and r.expert_ids.shape == (10, 2)
    flat = x.reshape(10, D)
    torch.testing.assert_close(y.reshape(10, D), moe.experts(flat, moe.router(flat), backend="eager"))


def test_shared_expert_with_sigmoid_gate_qwen2_style():
    shared = MLP(dim=D, hidden=F)
    moe = layer(shared_experts=shared, shared_gate=True)
    x = torch.randn(7, D)
    y, r = moe(x)
    routed = moe.experts(x, r, backend="eager")
    gate = torch.sigmoid(x @ moe.shared_expert_gate.weight.t())  # [T, 1]
    torch.testing.assert_close(y, routed + gate * shared(x))
    # without the gate, shared output is added as is
    moe2 = layer(shared_experts=shared)
    y2, r2 = moe2(x)
    torch.testing.assert_close(y2, moe2.experts(x, r2, backend="eager") + shared(x))


def test_dropless_layer_is_batch_independent():
    moe = layer().eval()
    x = torch.randn(32, D)
    other = x.clone()
    other[1:] = torch.randn(31, D) * 5
    torch.testing.assert_close(moe(x)[0][0], moe(other)[0][0], atol=1e-6, rtol=1e-6)


def test_capacity_layer_leaks_across_batch():
    """Capacity routing is not batch independent (documented): batch-mates can push a token out."""
    moe = layer(capacity_factor=0.5).eval()
    x = torch.randn(1, D).repeat(16, 1)  # 16 copies of one token: all want the same 2 experts
    y, r = moe(x)
    assert int(r.dropped) > 0
    assert not torch.allclose(y[0], y[-1])  # the first copies fit, the last ones were dropped


def test_capacity_never_exceeded():
    moe = layer(capacity_factor=1.0)
    y, r = moe(torch.randn(50, D))
    C = -(-50 * 2 // E)
    assert int(r.tokens_per_expert().max()) <= C


def test_gradients_flow_to_all_parts():
    moe = layer(shared_experts=MLP(dim=D, hidden=F), shared_gate=True)
    y, r = moe(torch.randn(3, 4, D))
    (y.square().mean() + r.total_aux()).backward()
    for n, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_config_round_trip_gives_identical_outputs():
    moe = layer(shared_experts=MLP(dim=D, hidden=F), shared_gate=True, capacity_factor=2.0).eval()
    cfg = json.loads(json.dumps(moe.config()))
    clone = MoE.from_config(cfg).eval()
    clone.load_state_dict(moe.state_dict())
    x = torch.randn(9, D)
    torch.testing.assert_close(clone(x)[0], moe(x)[0])


def test_routing_stats():
    moe = layer()
    _, r = moe(torch.randn(10, D))
    assert int(r.tokens_per_expert().sum()) == 20
    s = r.stats()
    assert s["active_per_token"] == 2.0 and s["dropped"] == 0.0 and s["max_over_mean_load"] >= 1.0
    assert s["tokens_without_expert"] == 0.0
    _, r = layer(capacity_factor=0.1)(torch.randn(1, D).repeat(40, 1))  # identical tokens overflow their experts
    assert r.stats()["tokens_without_expert"] == 40 - 1  # C = ceil(0.1 * 40 * 2 / 8) = 1 slot per expert


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="routes over 8 experts but experts has 4"):
        MoE(router=build_router("topk", dim=D, num_experts=E), experts=Experts(num_experts=4, dim=D, hidden=F))
    with pytest.raises(ValueError, match="shared_gate"):
        layer(shared_gate=True)
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(capacity_factor=-1.0)
    with pytest.raises(ValueError, match=r"\[T, D\] or \[B, L, D\]"):
        layer()(torch.randn(2, 2, 2, D))
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        layer()(torch.randn(4, D + 2))


def test_capacity_on_router_and_layer_is_refused():
    with pytest.raises(ValueError, match="not both"):
        MoE(
            router=build_router("switch", dim=D, num_experts=E, capacity_factor=1.0),
            experts=Experts(num_experts=E, dim=D, hidden=F),
            capacity_factor=1.0,
        )


def test_bf16_input_with_fp32_router():
    r = layer().router(torch.randn(6, D, dtype=torch.bfloat16))
    assert r.expert_ids.shape == (6, 2) and torch.isfinite(r.weights.float()).all()


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, None])
def test_sizes_must_be_positive_integers_everywhere(bad):
    from moekit.layers.variants import EXPERTS_VARIANTS, build_experts
    from moekit.models import LMConfig

    for name in EXPERTS_VARIANTS:  # one wording across the experts variants, routers and configs
        with pytest.raises(ValueError, match=r"\w+: hidden must be a positive integer"):
            build_experts(name, num_experts=2, dim=D, hidden=bad)
    with pytest.raises(ValueError, match="TopKRouter: num_experts must be a positive integer"):
        build_router("topk", dim=D, num_experts=bad)
    with pytest.raises(ValueError, match="LMConfig.moe_iterations must be a positive integer"):
        LMConfig(moe_iterations=bad)


@pytest.mark.parametrize("backend", ["eager", "loop", "grouped", "auto"])
def test_input_dtype_mismatch_is_named_at_the_layer_entry(backend):
    """Before: a raw matmul dtype error from inside the dispatch backend."""
    moe = MoE(router=build_router("topk", dim=D, num_experts=E, k=2),
              experts=Experts(num_experts=E, dim=D, hidden=F, backend=backend))
    with pytest.raises(TypeError, match=r"MoE \(experts\): input dtype torch.float64 does not match the "
                                        r"weights' dtype torch.float32; convert the input \(x.to\(torch.float32\)\) "
                                        r"or the layer \(layer.to\(torch.float64\)\)"):
        moe(torch.randn(2, 3, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="input dtype torch.float32 does not match the weights' dtype torch.bfloat16"):
        moe.to(torch.bfloat16)(torch.randn(5, D))
    moe.to(torch.float64)
    if backend == "grouped":  # torch's grouped_mm has no float64: said so, not a kernel error
        with pytest.raises(TypeError, match="grouped_mm takes .*not torch.float64; use backend='loop'"):
            moe(torch.randn(5, D, dtype=torch.float64))
    else:
        moe(torch.randn(5, D, dtype=torch.float64))  # converted as the message says: runs
    # an fp32 router in front of bf16 experts is allowed (routers cast their input): only the experts count
    moe.experts.to(torch.bfloat16)
    y, _ = moe(torch.randn(5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.router.weight.dtype == torch.float64


def test_shared_experts_dtype_is_checked_too():
    moe = layer(shared_experts=MLP(dim=D, hidden=F).to(torch.bfloat16))
    with pytest.raises(TypeError, match=r"MoE \(shared experts\): input dtype torch.float32 .* torch.bfloat16"):
        moe(torch.randn(4, D))


def test_layer_under_autocast_runs_with_mixed_dtypes():
    """Inside torch.autocast the mismatch is expected: no error, bf16 output, fp32 gradients."""
    moe = layer(shared_experts=MLP(dim=D, hidden=F), shared_gate=True)
    x = torch.randn(2, 5, D, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
        ref = moe.experts(x.reshape(10, D), moe.router(x.reshape(10, D)), backend="eager")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert moe.experts.gate_up_proj.grad.dtype == torch.float32 and moe.experts.gate_up_proj.grad.abs().sum() > 0
    s = moe.shared_experts(x.reshape(10, D).float())
    gate = torch.sigmoid(x.reshape(10, D).float() @ moe.shared_expert_gate.weight.t())
    torch.testing.assert_close(y.reshape(10, D).float(), (ref.float() + gate * s).detach(), atol=5e-2, rtol=5e-2)


def test_dtype_check_covers_every_experts_variant():
    """Variants declare no `weight_dtype`: the layer reads their first floating-point parameter."""
    from moekit.layers.variants import EXPERTS_VARIANTS, build_experts

    for name in EXPERTS_VARIANTS:
        n = 2 if name in ("duo", "hecto") else E  # two fixed experts: big + small, FFN + GRU
        moe = MoE(router=build_router("topk", dim=D, num_experts=n, k=1),
                  experts=build_experts(name, num_experts=n, dim=D, hidden=F))
        with pytest.raises(TypeError, match=r"MoE \(experts\): input dtype torch.float64 .* torch.float32"):
            moe(torch.randn(1, 3, D, dtype=torch.float64))
