"""Activations by name: the clamped SwiGLU (HY-V4, GPT-OSS) against its formula and on every
dispatch backend (gradients included), and the order in which backends add the experts' outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.layers import Experts, list_backends
from moekit.layers.activations import ClampedSwiGLU, get_activation
from moekit.layers.dispatch import grouped_mm_available
from moekit.routing import Routing
from tests.layers.test_dispatch import random_routing, run

BACKENDS = [b for b in list_backends() if b not in ("eager", "auto")]


def test_clamped_swiglu_formulas():
    gate, up = torch.randn(64, 7) * 3, torch.randn(64, 7) * 3
    hy = get_activation("clamped_swiglu", limit=1.5)  # HY-V4: SiLU, no offset
    want = F.silu(gate.clamp(max=1.5)) * up.clamp(-1.5, 1.5)
    assert torch.equal(hy.glu(gate, up), want)
    oss = get_activation("clamped_swiglu", limit=7.0, alpha=1.702, up_offset=1.0)  # GPT-OSS
    g = gate.clamp(max=7.0)
    want = (up.clamp(-7.0, 7.0) + 1) * (g * torch.sigmoid(g * 1.702))
    torch.testing.assert_close(oss.glu(gate, up), want, atol=0, rtol=0)


@pytest.mark.parametrize("args", [dict(limit=0.7), dict(limit=0.7, alpha=1.702, up_offset=1.0)])
def test_clamped_swiglu_gradient_is_autograd(args):
    act = ClampedSwiGLU(**args)
    gate = (torch.randn(50, 6, dtype=torch.float64) * 2).requires_grad_()
    up = (torch.randn(50, 6, dtype=torch.float64) * 2).requires_grad_()
    grad = torch.randn(50, 6, dtype=torch.float64)
    act.glu(gate, up).backward(grad)
    d_gate, d_up = act.glu_grad(grad, gate.detach(), up.detach())
    assert (gate > 0.7).any() and (up.abs() > 0.7).any()  # both clamps bind somewhere
    torch.testing.assert_close(d_gate, gate.grad)
    torch.testing.assert_close(d_up, up.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args", [dict(limit=0.5), dict(limit=0.5, alpha=1.702, up_offset=1.0)])
def test_clamped_swiglu_every_backend_equals_eager(backend, args):
    if backend == "grouped" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch.nn.functional.grouped_mm not in this torch")
    torch.manual_seed(0)
    experts = Experts(num_experts=6, dim=16, hidden=8, activation="clamped_swiglu", activation_args=args)
    with torch.no_grad():
        experts.gate_up_proj.mul_(3)  # pre-activations of a few units: both clamps bind
    x = torch.randn(40, 16)
    routing = random_routing(40, 6, 3, empty_frac=0.1)
    ref, got = run(experts, x, routing, "eager"), run(experts, x, routing, backend)
    h = x @ experts.gate_up_proj[0].detach().t()
    assert (h[:, :8] > 0.5).any() and (h[:, 8:].abs() > 0.5).any()
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], atol=1e-5, rtol=1e-5, msg=n)


def test_activation_arguments_are_checked_and_saved():
    experts = Experts(num_experts=2, dim=4, hidden=4, activation="clamped_swiglu", activation_args={"limit": 7})
    assert experts.config()["activation_args"] == {"limit": 7.0, "alpha": 1.0, "up_offset": 0.0}
    assert Experts(**experts.config()).act.args() == experts.act.args()
    assert "activation_args" not in Experts(num_experts=2, dim=4, hidden=4).config()
    with pytest.raises(ValueError, match="limit must be a number > 0"):
        get_activation("clamped_swiglu", limit=0)
    with pytest.raises(ValueError, match="clamped_swiglu"):
        get_activation("clamped_swiglu")  # limit is required
    with pytest.raises(ValueError, match="takes no arguments"):
        get_activation("silu", limit=1.0)
    with pytest.raises(ValueError, match="known: .*clamped_swiglu.*silu"):
        get_activation("swiglu7")
    with pytest.raises(ValueError, match="gated=True"):
        Experts(num_experts=2, dim=4, hidden=4, gated=False, activation="clamped_swiglu",
                activation_args={"limit": 1.0})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
def test_bf16_backends_add_outputs_as_eager(backend, weights_dtype):
    """In bf16 every backend adds a token's expert outputs in eager's order and rounding (bit for
    bit), with routing weights kept in float32 when the router gives them so."""
    if backend == "grouped":
        pytest.skip("grouped_mm multiplies in its own order; equal to eager within tolerance only")
    torch.manual_seed(0)
    experts = Experts(num_experts=6, dim=40, hidden=13).to(torch.bfloat16)
    x = torch.randn(256, 40, dtype=torch.bfloat16)
    r = random_routing(256, 6, 3, empty_frac=0.1)
    r = Routing(r.expert_ids, r.weights.to(weights_dtype), r.logits, 6)
    with torch.no_grad():
        want, got = experts(x, r, backend="eager"), experts(x, r, backend=backend)
    assert torch.equal(got, want)
    if weights_dtype == torch.float32:  # the weights are not rounded to bf16 before scaling
        r16 = Routing(r.expert_ids, r.weights.to(torch.bfloat16), r.logits, 6)
        with torch.no_grad():
            assert not torch.equal(experts(x, r16, backend="eager"), want)


@pytest.mark.parametrize("name", ["silu", "clamped_swiglu"])
def test_fused_backward_matches_autograd_and_computes_the_gate_activation_once(name, monkeypatch):
    """The loop backend's backward recomputes act(gate) once per expert (output and gradients share it)."""
    from moekit.layers.fused_mlp import fused_expert_mlp

    act = get_activation(name, **({"limit": 0.7} if name == "clamped_swiglu" else {}))
    calls = []
    real_silu = F.silu
    monkeypatch.setattr(F, "silu", lambda t, *a, **kw: calls.append(1) or real_silu(t, *a, **kw))
    if name == "silu":
        act.fn = F.silu  # the patched one
    torch.manual_seed(0)
    counts = [5, 0, 7]
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    y = fused_expert_mlp(x, w1, w2, counts, act, True)
    assert len(calls) == 2  # forward: once per non-empty expert
    calls.clear()
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w1, w2], gy)
    assert len(calls) == 2  # backward: once per non-empty expert (was twice)
    rows = torch.split(x, counts)
    ref = torch.cat([
        act.glu(*(r @ w1[e].t()).chunk(2, dim=-1)) @ w2[e].t() for e, r in enumerate(rows)
    ])
    want = torch.autograd.grad(ref, [x, w1, w2], gy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
