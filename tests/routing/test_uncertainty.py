"""Uncertainty-aware router: variance damps the weights; sampling only in training."""

import math

import torch

from moekit.routing import build_router


def test_calibrated_weights_and_variance_damping():
    torch.manual_seed(0)
    E, D = 4, 16
    router = build_router("uncertainty", dim=D, num_experts=E, k=E, normalize=False).eval()
    x = torch.randn(5, D)
    r = router(x)
    mu = x @ router.weight.detach().t()
    var = torch.nn.functional.softplus(torch.zeros(5, E)) + 1e-6
    cal = torch.softmax(mu / torch.sqrt(1 + math.pi * var / 8), dim=-1)
    torch.testing.assert_close(r.weights, cal.gather(1, r.expert_ids), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        router.var_weight.copy_(router.weight * 50)  # huge variance on confident logits
    assert r.weights.max() > router(x).weights.max()  # more uncertainty, flatter weights


def test_training_samples_eval_is_deterministic():
    torch.manual_seed(0)
    router = build_router("uncertainty", dim=16, num_experts=8, k=1)
    x = torch.randn(200, 16)
    assert not torch.equal(router(x).expert_ids, router(x).expert_ids)
    router.eval()
    assert torch.equal(router(x).expert_ids, router(x).expert_ids)
    router.train()
    r = router(x)
    assert float(r.aux["uncertainty"].detach()) > 0
    r.total_aux().backward()
    assert router.var_weight.grad.abs().sum() > 0
