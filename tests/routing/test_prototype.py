"""Prototype router: cosine similarity to prototypes, routing contrastive loss, conditional split."""

import torch
import torch.nn.functional as F

from moekit.routing import RoutingContext, build_router
from moekit.routing.prototype import routing_contrastive_loss


def test_token_on_a_prototype_goes_to_that_expert():
    E, D = 6, 16
    router = build_router("prototype", dim=D, num_experts=E, k=1, contrastive=0.0).eval()
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(D))
        x = router.prototypes.detach()[[4, 1, 1, 0]] * torch.tensor([[2.0], [0.5], [3.0], [1.0]])
        r = router(x)
    assert r.expert_ids[:, 0].tolist() == [4, 1, 1, 0]  # scale-free: cosine similarity
    cos = F.normalize(x, dim=-1) @ F.normalize(router.prototypes.detach(), dim=-1).t()
    torch.testing.assert_close(r.logits, cos / router.temperature)


def test_contrastive_loss_low_when_centroids_match_prototypes():
    P = torch.eye(4)
    z = torch.cat([P + 0.01 * torch.randn(4, 4), P + 0.01 * torch.randn(4, 4)])
    choice = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    good = routing_contrastive_loss(z, P, choice, 0.1)
    bad = routing_contrastive_loss(z, P, choice.roll(1), 0.1)
    assert float(good) < 0.01 < float(bad)


def test_unconditional_tokens_use_only_unconditional_experts():
    torch.manual_seed(0)
    E, U, T = 8, 2, 40
    router = build_router("prototype", dim=16, num_experts=E, k=2, num_uncond=U).train()
    uncond = torch.arange(T) % 3 == 0
    r = router(torch.randn(T, 16), context=RoutingContext(uncond=uncond))
    assert (r.expert_ids[uncond] >= E - U).all()
    assert ((r.expert_ids[~uncond] >= 0) & (r.expert_ids[~uncond] < E - U)).all()
    r.total_aux().backward()
    assert router.prototypes.grad.abs().sum() > 0
