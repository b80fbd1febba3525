"""THOR: random experts in training, consistency regulariser between two stochastic passes."""

import pytest
import torch

from moekit.layers import Experts, MoE
from moekit.routing import build_router
from moekit.routing.stochastic import consistency_loss, thor_objective


def test_training_is_uniform_random_and_eval_modes():
    torch.manual_seed(0)
    E, T = 4, 8000
    router = build_router("stochastic", dim=16, num_experts=E)
    r1, r2 = router(torch.randn(T, 16)), router(torch.randn(T, 16))
    assert r1.top_k == 1 and not torch.equal(r1.expert_ids, r2.expert_ids)
    share = r1.tokens_per_expert().float() / T
    assert (share - 1 / E).abs().max() < 0.03
    router.eval()
    x = torch.randn(10, 16)
    assert torch.equal(router(x).expert_ids, router(x).expert_ids)
    avg = build_router("stochastic", dim=16, num_experts=E, eval_mode="average").eval()(x)
    assert avg.expert_ids.tolist() == [list(range(E))] * 10
    torch.testing.assert_close(avg.weights, torch.full((10, E), 1 / E))


def test_consistency_loss_properties():
    a = torch.randn(3, 5, 11)
    assert float(consistency_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(3, 5, 11)
    assert float(consistency_loss(a, b)) > 0
    assert float(consistency_loss(a, b)) == pytest.approx(float(consistency_loss(b, a)), rel=1e-5)


def test_thor_objective_two_passes_differ_and_train_experts():
    torch.manual_seed(0)
    moe = MoE(router=build_router("stochastic", dim=16, num_experts=4),
              experts=Experts(num_experts=4, dim=16, hidden=8))
    head = torch.nn.Linear(16, 7)
    x, y = torch.randn(2, 6, 16), torch.randint(0, 7, (2, 6))
    loss, parts = thor_objective(lambda: head(moe(x)[0]), y, alpha=2.0)
    assert parts["consistency"] > 0  # the two passes used different experts
    torch.testing.assert_close(loss.detach(), parts["ce"] + 2.0 * parts["consistency"])
    loss.backward()
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0
