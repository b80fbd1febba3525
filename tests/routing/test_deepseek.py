"""DeepSeek router: parity with Hugging Face DeepSeek-V3 routing, group limit, bias behaviour."""

import pytest
import torch

from moekit.routing import RoutingContext, build_router


def _sorted(ids, weights):
    """Sort each token's slots by expert id (order-insensitive comparison)."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _hf_router(E, n_group, topk_group, k, norm, scale, dim=16):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=dim, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=scale, num_hidden_layers=1, vocab_size=32,
        intermediate_size=32, moe_intermediate_size=8, num_attention_heads=2, num_key_value_heads=2,
    )
    return DeepseekV3TopkRouter(cfg)


@pytest.mark.parametrize(
    ("E", "n_group", "topk_group", "k", "norm", "scale"),
    [(8, 1, 1, 2, True, 1.0), (16, 4, 2, 4, True, 2.5), (32, 8, 3, 6, False, 1.0), (12, 3, 1, 3, True, 1.5),
     (64, 8, 4, 8, True, 2.5)],
)
def test_equals_hf_deepseek_v3(E, n_group, topk_group, k, norm, scale):
    pytest.importorskip("transformers")
    torch.manual_seed(E + k)
    hf = _hf_router(E, n_group, topk_group, k, norm, scale)
    ours = build_router(
        "deepseek", dim=16, num_experts=E, k=k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=scale, scoring="sigmoid",
    ).eval()
    with torch.no_grad():
        hf.weight.normal_(std=0.5)
        hf.e_score_correction_bias.uniform_(-0.1, 0.1)
        ours.weight.copy_(hf.weight)
        ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(64, 16)
    hf_logits, hf_w, hf_ids = hf(x)
    r = ours(x)
    torch.testing.assert_close(r.logits, hf_logits, rtol=0, atol=0)
    ids_a, w_a = _sorted(r.expert_ids, r.weights)
    ids_b, w_b = _sorted(hf_ids, hf_w)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=1e-6)


def test_equals_hf_deepseek_v2_group_limited_greedy():
    pytest.importorskip("transformers")
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    torch.manual_seed(0)
    cfg = DeepseekV2Config(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=1.5, num_hidden_layers=1, vocab_size=32,
        num_attention_heads=2, num_key_value_heads=2,
    )
    hf = DeepseekV2TopkRouter(cfg)
    ours = build_router(
        "deepseek", dim=16, num_experts=16, k=3, n_group=4, topk_group=2, scoring="softmax",
        group_score="max", norm_topk_prob=False, routed_scaling_factor=1.5,
    ).eval()
    with torch.no_grad():
        hf.weight.normal_(std=0.5)
        ours.weight.copy_(hf.weight)
    x = torch.randn(64, 16)
    _, hf_w, hf_ids = hf(x)
    r = ours(x)
    ids_a, w_a = _sorted(r.expert_ids, r.weights)
    ids_b, w_b = _sorted(hf_ids, hf_w)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=1e-6)


def test_group_limit_respected():
    torch.manual_seed(1)
    E, G, TG = 32, 8, 2
    router = build_router("deepseek", dim=16, num_experts=E, k=5, n_group=G, topk_group=TG).eval()
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.2, 0.2)
    r = router(torch.randn(200, 16))
    groups = r.expert_ids // (E // G)  # [T, k]
    for row in groups:
        assert len(set(row.tolist())) <= TG
    # ...and the kept groups are the best ones by the sum of their top-2 biased scores.
    scores = r.meta["scores"] + router.e_score_correction_bias
    gs = scores.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)  # [T, G]
    best = gs.topk(TG, dim=-1).indices
    for row, keep in zip(groups, best, strict=True):
        assert set(row.tolist()) <= set(keep.tolist())


def test_without_group_limit_is_plain_topk_of_biased_scores():
    torch.manual_seed(2)
    router = build_router("deepseek", dim=16, num_experts=8, k=3).eval()
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.3, 0.3)
    r = router(torch.randn(50, 16))
    ref = (r.meta["scores"] + router.e_score_correction_bias).topk(3, dim=-1).indices
    assert torch.equal(r.expert_ids.sort(-1).values, ref.sort(-1).values)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(3)
    router = build_router("deepseek", dim=16, num_experts=8, k=2, norm_topk_prob=False).eval()
    x = torch.randn(40, 16)
    before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0  # expert 5 now always wins selection
    after = router(x)
    assert (after.expert_ids == 5).any(dim=1).all()
    assert not torch.equal(before.expert_ids, after.expert_ids)
    # Weights are the unbiased sigmoid scores of whichever experts were chosen.
    scores = torch.sigmoid(x @ router.weight.t())
    torch.testing.assert_close(after.weights, scores.gather(1, after.expert_ids))
    assert (after.weights < 1).all()  # the +10 bias never entered a weight


def test_norm_and_scaling():
    torch.manual_seed(4)
    router = build_router("deepseek", dim=16, num_experts=8, k=3, routed_scaling_factor=2.5).eval()
    r = router(torch.randn(20, 16))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((20,), 2.5))


def test_zero_rate_disables_update():
    router = build_router("deepseek", dim=16, num_experts=8, bias_update_rate=0.0).train()
    router(torch.randn(10, 16))
    assert torch.equal(router.e_score_correction_bias, torch.zeros(8))


def test_losses():
    torch.manual_seed(6)
    router = build_router("deepseek", dim=16, num_experts=8, k=2, load_balance=0.1, seq_balance=0.01,
                          z_loss=1e-3).eval()
    x = torch.randn(12, 16)
    with pytest.raises(ValueError, match="seq_len"):
        router(x)
    r = router(x, context=RoutingContext(seq_len=6))
    s = torch.sigmoid(x @ router.weight.t())
    p = s / s.sum(-1, keepdim=True)
    f = torch.stack([(r.expert_ids == e).sum().float() for e in range(8)]) / (12 * 2)
    torch.testing.assert_close(r.aux["load_balance"], 0.1 * 8 * (f * p.mean(0)).sum())
    seq = []
    for b in range(2):
        ids, pp = r.expert_ids[6 * b: 6 * b + 6], p[6 * b: 6 * b + 6]
        fb = torch.stack([(ids == e).sum().float() for e in range(8)]) * 8 / (2 * 6)
        seq.append((fb * pp.mean(0)).sum())
    torch.testing.assert_close(r.aux["seq_balance"], 0.01 * torch.stack(seq).mean())
    assert set(r.aux) == {"load_balance", "seq_balance", "z_loss"}


def test_bf16_input_routes_in_float32():
    torch.manual_seed(7)
    router = build_router("deepseek", dim=16, num_experts=8).eval()
    x = torch.randn(10, 16).bfloat16()
    r = router(x)
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"k": 9}, "k"), ({"scoring": "tanh"}, "scoring"), ({"n_group": 3}, "n_group"),
     ({"n_group": 4, "topk_group": 5}, "topk_group"), ({"n_group": 4, "topk_group": 1, "k": 3}, "k"),
     ({"group_score": "mean"}, "group_score"), ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
     ({"bias_update_rate": -1.0}, "bias_update_rate"), ({"seq_balance": -1.0}, "seq_balance")],
)
def test_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_router("deepseek", dim=16, num_experts=8, **kwargs)


def test_bias_stays_float32_when_cast():
    router = build_router("deepseek", dim=16, num_experts=8)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(0.3001)
    router = router.bfloat16()
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == pytest.approx(0.3001, abs=1e-7)
    r = router.train()(torch.randn(8, 16).bfloat16())
    assert r.weights.dtype == torch.bfloat16 and r.logits.dtype == torch.float32
    assert "e_score_correction_bias" in router.state_dict()
