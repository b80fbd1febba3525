"""Chain-of-Experts layer: iterations re-route on the previous output; C = 1 equals a plain MoE."""

import torch

from moekit.layers import Experts, MoE
from moekit.layers.chain import ChainMoE
from moekit.routing import build_router

D, E = 16, 6


def test_one_iteration_equals_plain_moe():
    torch.manual_seed(0)
    router = build_router("topk", dim=D, num_experts=E, k=2)
    experts = Experts(num_experts=E, dim=D, hidden=8)
    x = torch.randn(2, 5, D)
    y_chain, r_chain = ChainMoE(routers=[router], experts=experts)(x)
    y_moe, r_moe = MoE(router=router, experts=experts)(x)
    torch.testing.assert_close(y_chain, y_moe)
    assert torch.equal(r_chain.expert_ids, r_moe.expert_ids)


def test_two_iterations_match_a_hand_written_chain():
    torch.manual_seed(1)
    r1, r2 = (build_router("topk", dim=D, num_experts=E, k=1) for _ in range(2))
    experts = Experts(num_experts=E, dim=D, hidden=8)
    layer = ChainMoE(routers=[r1, r2], experts=experts)
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
