"""Every dispatch backend equals `eager` (the reference), outputs and gradients, over many shapes."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import Experts, get_backend, list_backends
from moekit.routing import Routing

FAST = [b for b in list_backends() if b != "eager"]


def random_routing(T: int, E: int, k: int, *, empty_frac: float = 0.0, one_expert: bool = False) -> Routing:
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if one_expert:  # every token's slots go to experts 0..k-1; the others get nothing
        ids = torch.arange(k).expand(T, k).clone()
    if empty_frac:
        ids[torch.rand(T, k) < empty_frac] = -1
    w = torch.rand(T, k)
    w[ids < 0] = 0.0
    return Routing(ids, w, torch.zeros(T, E), num_experts=E)


def run(experts: Experts, x: torch.Tensor, routing: Routing, backend: str):
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    w = routing.weights.detach().requires_grad_(True)
    r = Routing(routing.expert_ids, w, routing.logits, routing.num_experts)
    y = experts(x, r, backend=backend)
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return y.detach(), x.grad, w.grad, grads


CASES = [
    # (T, E, k, empty_frac, one_expert)
    (33, 4, 2, 0.0, False),
    (64, 8, 2, 0.0, False),
    (40, 16, 4, 0.2, False),  # empty slots (dropped / null)
    (3, 8, 1, 0.0, False),  # most experts receive no token
    (1, 8, 2, 0.0, False),  # T = 1 (decode)
    (20, 6, 1, 0.0, True),  # all tokens on one expert
    (20, 6, 3, 0.0, True),
    (17, 5, 5, 0.1, False),  # k = E
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T,E,k,empty,one", CASES)
@pytest.mark.parametrize("gated,act", [(True, "silu"), (True, "gelu"), (False, "gelu_tanh")])
def test_backend_equals_eager(backend, T, E, k, empty, one, gated, act):
    D, F = 12, 20
    experts = Experts(num_experts=E, dim=D, hidden=F, gated=gated, activation=act)
    x = torch.randn(T, D)
    routing = random_routing(T, E, k, empty_frac=empty, one_expert=one)
    ref = run(experts, x, routing, "eager")
    got = run(experts, x, routing, backend)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], atol=1e-5, rtol=1e-5, msg=n)


def test_eager_matches_hand_computed_expert():
    D, F, E = 4, 3, 2
    experts = Experts(num_experts=E, dim=D, hidden=F)
    x = torch.randn(2, D)
    ids = torch.tensor([[1, -1], [0, 1]])
    w = torch.tensor([[0.7, 0.0], [0.4, 0.6]])
    y = experts(x, Routing(ids, w, torch.zeros(2, E), num_experts=E), backend="eager")

    def expert(e, v):
        g, u = (experts.gate_up_proj[e] @ v).split(F)
        return experts.down_proj[e] @ (torch.nn.functional.silu(g) * u)

    want = torch.stack([0.7 * expert(1, x[0]), 0.4 * expert(0, x[1]) + 0.6 * expert(1, x[1])])
    torch.testing.assert_close(y, want)


def test_empty_slots_cost_no_compute():
    experts = Experts(num_experts=4, dim=8, hidden=8)
    routing = random_routing(10, 4, 2)
    routing.expert_ids[:] = -1
    routing.weights[:] = 0
    for b in list_backends():
        assert torch.count_nonzero(experts(torch.randn(10, 8), routing, backend=b)) == 0


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match="known dispatch backends: .*eager.*loop"):
        get_backend("warp-speed")
    with pytest.raises(ValueError, match="known"):
        Experts(num_experts=2, dim=4, hidden=4, backend="warp-speed")


@pytest.mark.parametrize("backend", list_backends())
def test_out_of_range_ids_are_rejected(backend):
    """Every backend gets its token plan from `Experts.forward`, which checks the ids (before: `eager`
    dropped an id of 4 at E = 4 silently)."""
    experts = Experts(num_experts=4, dim=8, hidden=8)
    bad = Routing(torch.tensor([[4]]), torch.ones(1, 1), torch.zeros(1, 4), num_experts=4)
    with pytest.raises(ValueError, match=r"\[-1, 4\), found 4"):
        experts(torch.randn(1, 8), bad, backend=backend)
    worse = Routing(torch.tensor([[-2]]), torch.ones(1, 1), torch.zeros(1, 4), num_experts=4)
    with pytest.raises(ValueError, match=r"\[-1, 4\), found -2"):
        experts(torch.randn(1, 8), worse, backend=backend)


def test_experts_shape_errors():
    experts = Experts(num_experts=4, dim=8, hidden=8)
    r = random_routing(3, 4, 1)
    with pytest.raises(ValueError, match=r"\[T, 8\]"):
        experts(torch.randn(3, 9), r)
    with pytest.raises(ValueError, match="covers 3 tokens"):
        experts(torch.randn(5, 8), r)
    with pytest.raises(ValueError, match="hidden"):
        Experts(num_experts=4, dim=8, hidden=0)


@pytest.mark.parametrize("backend", FAST)
def test_inference_path_equals_eager(backend):
    experts = Experts(num_experts=6, dim=12, hidden=20)
    x = torch.randn(30, 12)
    routing = random_routing(30, 6, 2, empty_frac=0.1)
    with torch.inference_mode():
        got = experts(x, routing, backend=backend)
        ref = experts(x, routing, backend="eager")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def per_token_reference(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """sum over slots of weight * expert(x_t), one token and one slot at a time (no dispatch at all)."""
    F_ = experts.hidden
    W1 = experts.gate_up_proj if experts.gated else experts.up_proj
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for e, w in zip(routing.expert_ids[t].tolist(), routing.weights[t], strict=True):
            if e < 0:
                continue
            h = W1[e] @ x[t]
            a = experts.act(h[:F_]) * h[F_:] if experts.gated else experts.act(h)
            y = y + w * (experts.down_proj[e] @ a)
        rows.append(y)
    return torch.stack(rows)


# Widths whose rows are not a multiple of 16 bytes (torch grouped_mm's stride rule): F = 13, 7, 1 in
# fp32 and bf16, D = 33 in both, D = 40 in bf16 (80 bytes is fine, but 2F and F are not).
ODD = [(D, F) for D in (40, 33) for F in (13, 7, 1)]


@pytest.mark.parametrize("D,F", ODD)
@pytest.mark.parametrize("gated", [True, False])
def test_eager_at_odd_widths_equals_per_token_reference(D, F, gated):
    experts = Experts(num_experts=5, dim=D, hidden=F, gated=gated)
    x, routing = torch.randn(9, D), random_routing(9, 5, 2, empty_frac=0.1)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, routing, backend="eager"), per_token_reference(experts, x, routing),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("D,F", ODD)
@pytest.mark.parametrize("gated", [True, False])
def test_odd_widths_equal_eager_fp32(backend, D, F, gated):
    """Before: `grouped` failed with "strides should be multiple of 16 bytes"."""
    experts = Experts(num_experts=5, dim=D, hidden=F, gated=gated, activation="gelu" if gated else "relu")
    x, routing = torch.randn(29, D), random_routing(29, 5, 2, empty_frac=0.1)
    ref, got = run(experts, x, routing, "eager"), run(experts, x, routing, backend)
    for a, b, what in [(got[0], ref[0], "y"), (got[1], ref[1], "grad x"), (got[2], ref[2], "grad weights")]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("D,F", [(40, 13), (33, 7), (40, 20), (12, 1)])
def test_odd_widths_equal_eager_bf16(backend, D, F):
    """bf16 on CPU: `grouped` (grouped_mm runs bf16 here) and `loop` against `eager` in bf16."""
    torch.manual_seed(0)
    experts = Experts(num_experts=4, dim=D, hidden=F).to(torch.bfloat16)
    x, routing = torch.randn(23, D, dtype=torch.bfloat16), random_routing(23, 4, 2)
    routing = Routing(routing.expert_ids, routing.weights.bfloat16(), routing.logits, 4)
    ref, got = run(experts, x, routing, "eager"), run(experts, x, routing, backend)
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], **tol, msg=n)


def test_grouped_odd_widths_without_tokens_and_in_inference():
    experts = Experts(num_experts=4, dim=33, hidden=13)
    empty = random_routing(6, 4, 2, empty_frac=1.0)
    assert torch.count_nonzero(experts(torch.randn(6, 33), empty, backend="grouped")) == 0
    x, routing = torch.randn(11, 33), random_routing(11, 4, 3)
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, routing, backend="grouped"), experts(x, routing, backend="eager"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("weights,inp", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                         (torch.bfloat16, torch.float32)])
def test_input_dtype_mismatch_is_named_at_entry(backend, weights, inp):
    """Before: a raw "expected m1 and m2 to have the same dtype" from inside the backend."""
    experts = Experts(num_experts=4, dim=8, hidden=8, backend=backend).to(weights)
    with pytest.raises(TypeError, match=rf"Experts: input dtype {inp} does not match the weights' dtype "
                                        rf"{weights}; convert the input \(x.to\({weights}\)\)"):
        experts(torch.randn(3, 8, dtype=inp), random_routing(3, 4, 2))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("weights,inp", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                         (torch.bfloat16, torch.float32)])
def test_autocast_runs_every_backend_in_its_dtype(backend, weights, inp):
    """Inside torch.autocast a dtype mismatch is expected: no error, every backend computes the experts
    in autocast's dtype (as nn.Linear would) and agrees with eager; gradients reach the weights in their dtype."""
    torch.manual_seed(0)
    experts = Experts(num_experts=4, dim=16, hidden=13).to(weights)
    x, routing = torch.randn(21, 16, dtype=inp), random_routing(21, 4, 2, empty_frac=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = run(experts, x, routing, "eager"), run(experts, x, routing, backend)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for n, g in got[3].items():
        assert g.dtype == weights
        torch.testing.assert_close(g, ref[3][n], **tol, msg=n)


def test_float64_runs_on_every_backend_but_grouped_which_says_so():
    experts = Experts(num_experts=4, dim=8, hidden=5).double()
    x, routing = torch.randn(7, 8, dtype=torch.float64), random_routing(7, 4, 2)
    ref = experts(x, routing, backend="eager")
    for b in ("loop", "auto"):
        torch.testing.assert_close(experts(x, routing, backend=b), ref)
    with pytest.raises(TypeError, match=r"'grouped': torch's grouped_mm takes torch.float32, torch.bfloat16, "
                                        r"torch.float16, not torch.float64; use backend='loop'"):
        experts(x, routing, backend="grouped")


def test_plan_sorts_by_expert_then_slot_then_token():
    """Hand-computed: within an expert, rows come by slot, then token; -1 slots are cut off."""
    from moekit.layers.dispatch import plan

    ids = torch.tensor([[1, 0], [0, 1], [1, -1], [0, 1]])  # [T=4, k=2]
    p = plan(ids, 3)
    # expert 0: (t0, j1), (t1, j0), (t3, j0) -> by slot: t1 j0, t3 j0, t0 j1; expert 1: t0 j0, t2 j0, t1 j1, t3 j1
    want = [1 * 2 + 0, 3 * 2 + 0, 0 * 2 + 1, 0 * 2 + 0, 2 * 2 + 0, 1 * 2 + 1, 3 * 2 + 1]
    assert p.order.tolist() == want and p.token.tolist() == [1, 3, 0, 0, 2, 1, 3] and p.counts == [3, 4, 0]
    part = plan(ids, 3, offset=1, num_local=1)
    assert part.order.tolist() == want[3:] and part.counts == [4]
