"""Experts variants (FiLM, SMEAR, Duo-LLM, Autonomy-of-Experts): each against a hand-written reference."""

import pytest
import torch

from moekit.layers import Experts, MoE, variants
from moekit.layers.autonomy import AutonomyExperts
from moekit.layers.duo import DuoExperts
from moekit.layers.film import FiLMExperts
from moekit.layers.smear import SmearExperts
from moekit.layers.variants import build_experts
from moekit.models import LMConfig, MoELM
from moekit.routing import Routing, RoutingContext, build_router
from tests.helpers import tiny_lm

D, E, F = 16, 4, 8


def glu(x, w1, w2):
    g, u = (x @ w1.t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u) @ w2.t()


def test_film_experts_are_modulations_of_one_shared_ffn():
    torch.manual_seed(0)
    ex = FiLMExperts(num_experts=E, dim=D, hidden=F)
    with torch.no_grad():
        ex.scale.normal_()
        ex.shift.normal_()
    x = torch.randn(5, D)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [0, 3]])
    w = torch.rand(5, 2) * (ids >= 0)
    y = ex(x, Routing(ids, w, torch.zeros(5, E), E))
    g, u = (x @ ex.gate_up_proj.t()).chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u
    ref = torch.zeros(5, D)
    for t in range(5):
        for s in range(2):
            e = int(ids[t, s])
            if e >= 0:
                ref[t] += w[t, s] * (((1 + ex.scale[e]) * h[t] + ex.shift[e]) @ ex.down_proj.t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_smear_merges_parameters_and_both_paths_agree():
    torch.manual_seed(0)
    B, L = 3, 5
    ex = SmearExperts(num_experts=E, dim=D, hidden=F)
    router = build_router("smear", dim=D, num_experts=E, causal=False)
    x = torch.randn(B * L, D, requires_grad=True)
    r = router(x, context=RoutingContext(seq_len=L))
    assert "example_weights" in r.meta and (r.weights.reshape(B, L, E) == r.weights.reshape(B, L, E)[:, :1]).all()
    fast = ex(x, r)
    slow = ex.forward_per_token(x, r.weights)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    gf = torch.autograd.grad(fast.square().sum(), [x, ex.gate_up_proj, router.weight], retain_graph=True)
    gs = torch.autograd.grad(slow.square().sum(), [x, ex.gate_up_proj, router.weight])
    for a, b in zip(gf, gs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # one merged expert: the weighted average of the experts' parameters, applied as a plain FFN
    p = r.meta["example_weights"][1].detach()
    W1 = torch.einsum("e,efd->fd", p, ex.gate_up_proj.detach())
    W2 = torch.einsum("e,edf->df", p, ex.down_proj.detach())
    torch.testing.assert_close(fast[L:2 * L].detach(), glu(x[L:2 * L].detach(), W1, W2), rtol=1e-5, atol=1e-5)



def test_duo_big_small_and_skip():
    torch.manual_seed(0)
    ex = DuoExperts(dim=D, hidden=F)
    assert ex.small_width == 2 and ex.small_gate_up.shape == (4, D)
    x = torch.randn(3, D)
    ids = torch.tensor([[0], [1], [-1]])
    y = ex(x, Routing(ids, torch.tensor([[0.5], [1.0], [0.0]]), torch.zeros(3, 3), 2))
    torch.testing.assert_close(y[0], 0.5 * glu(x[:1], ex.big_gate_up, ex.big_down)[0])
    torch.testing.assert_close(y[1], glu(x[1:2], ex.small_gate_up, ex.small_down)[0])
    assert (y[2] == 0).all()  # skipped: the block keeps only its residual
    with pytest.raises(ValueError, match="must be 2"):
        DuoExperts(num_experts=3, dim=D, hidden=F)


def test_autonomy_equals_experts_with_factorised_gate():
    torch.manual_seed(0)
    r_, k = 3, 2
    router = build_router("autonomy", dim=D, num_experts=E, k=k, rank=r_)
    ex = AutonomyExperts(num_experts=E, dim=D, hidden=F, rank=r_)
    x = torch.randn(6, D)
    routing = router(x)
    norms = torch.stack([(router.factor_a[e] @ x.t()).norm(dim=0) for e in range(E)], dim=1)  # [T, E]
    assert torch.equal(routing.expert_ids.sort(1).values, norms.topk(k).indices.sort(1).values)
    # the same experts as standard fused Experts whose gate rows are B_e A_e
    ref = Experts(num_experts=E, dim=D, hidden=F, backend="eager")
    with torch.no_grad():
        gate = torch.einsum("efr,erd->efd", ex.gate_b, router.factor_a)
        ref.gate_up_proj.copy_(torch.cat([gate, ex.up_proj], dim=1))
        ref.down_proj.copy_(ex.down_proj)
    torch.testing.assert_close(ex(x, routing), ref(x, routing), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent"):
        ex(x, build_router("topk", dim=D, num_experts=E)(x))


@pytest.mark.parametrize(
    ("experts", "router", "router_args", "experts_args", "E_"),
    [
        ("film", "uncertainty", {"k": 2}, {}, 4),
        ("smear", "smear", {}, {}, 4),
        ("duo", "null_experts", {"k": 1, "num_null": 1, "normalize": False}, {"small_hidden": 4}, 2),
        ("autonomy", "autonomy", {"k": 2, "rank": 4}, {"rank": 4}, 4),
        ("lowrank", "topk", {"k": 2}, {"rank": {"0": 3, "1": 1}}, 4),
        ("qat", "topk", {"k": 2}, {"mode": "binary"}, 4),
    ],
)
def test_lm_builds_and_trains_with_each_variant(experts, router, router_args, experts_args, E_):
    cfg = tiny_lm(max_seq_len=16, num_experts=E_, expert_hidden=16, router=router, router_args=router_args,
                  experts=experts, experts_args=experts_args)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    model = MoELM(cfg)
    assert type(model.layers[0].mlp.experts).__name__ == type(build_experts(experts, num_experts=E_, dim=32,
                                                                          hidden=16, layer=0, **experts_args)).__name__
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    grads = [p.grad for p in model.layers[0].mlp.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    with pytest.raises(ValueError, match="experts must be one of"):
        LMConfig(experts="nope")


def test_moe_layer_accepts_a_variant():
    moe = MoE(router=build_router("uncertainty", dim=D, num_experts=E), experts=FiLMExperts(num_experts=E, dim=D,
                                                                                           hidden=F))
    y, r = moe(torch.randn(2, 3, D))
    assert y.shape == (2, 3, D)


def test_every_variant_declares_its_flops_per_token():
    """Routed-expert forward FLOPs per token from the loads [E] over T tokens, by hand for each variant."""
    D_, F_, T_ = 8, 12, 10
    load = torch.tensor([6.0, 4.0])  # token-slots of expert 0 and expert 1 over T_ tokens
    gated = 2 * 3 * D_ * F_  # one gated expert of width F on one token
    expected = {
        "ffn": gated * 10 / T_,  # every slot one expert
        "autonomy": gated * 10 / T_,  # counted as a gated expert per slot
        "smear": gated,  # one merged expert per token, whatever the slots
        "film": gated,  # the shared FFN once per token
        "duo": 2 * 3 * D_ * (F_ * 6 + 3 * 4) / T_,  # big (F) and small (F // 4 = 3) experts
        "hecto": (gated * 6 + 2 * (3 * (D_ * 5 + 5 * 5) + 5 * D_) * 4) / T_,  # FFN, then GRU of hidden 5
        "lowrank": gated,  # rank 0 (default): the shared base once per token, no per-slot delta
        "qat": gated * 10 / T_,  # fused experts with quantized weights: every slot one expert
    }
    assert set(expected) == set(variants.EXPERTS_VARIANTS)
    for name, want in expected.items():
        ex = build_experts(name, num_experts=2, dim=D_, hidden=F_, **({"gru_hidden": 5} if name == "hecto" else {}))
        assert ex.flops_per_token(load, T_) == pytest.approx(want), name
    plain = Experts(num_experts=2, dim=D_, hidden=F_, gated=False, activation="relu")
    assert plain.flops_per_token(load, T_) == pytest.approx(2 * 2 * D_ * F_ * 10 / T_)  # up and down only
