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
    with pytest.raises(ValueError, match="known: .*eager.*loop"):
        get_backend("warp-speed")
    with pytest.raises(ValueError, match="known"):
        Experts(num_experts=2, dim=4, hidden=4, backend="warp-speed")


def test_out_of_range_ids_are_rejected():
    experts = Experts(num_experts=4, dim=8, hidden=8)
    bad = Routing(torch.tensor([[4]]), torch.ones(1, 1), torch.zeros(1, 4), num_experts=4)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        experts(torch.randn(1, 8), bad, backend="loop")
    worse = Routing(torch.tensor([[-2]]), torch.ones(1, 1), torch.zeros(1, 4), num_experts=4)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        experts(torch.randn(1, 8), worse, backend="loop")


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
