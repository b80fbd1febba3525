"""Branch-Train-Mix: identical branches give the branch, the mix takes the branches' FFNs and averages the rest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moekit.convert.btx import BTXConfig, btx, check_one_seed
from moekit.convert.source import DenseSource
from tests.convert.conftest import dense_lm

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("router_std", [0.0, 1.0])
def test_identical_branches_give_the_branch(router_std):
    branch = dense_lm()
    moe = btx([branch, copy.deepcopy(branch), copy.deepcopy(branch)], BTXConfig(k=2, router_std=router_std)).eval()
    assert moe.config.num_experts == 3 and moe.config.expert_hidden == 48 and moe.config.router_args["k"] == 2
    out = moe(IDS)
    torch.testing.assert_close(out.logits, branch(IDS).logits, atol=1e-5, rtol=0)
    assert all(r.expert_ids.shape == (32, 2) for r in out.routings)
    if router_std == 0:
        assert torch.all(moe.layers[0].mlp.router.weight == 0)


def test_experts_are_the_branches_ffns_and_the_rest_is_averaged():
    a, b = dense_lm(seed=1), dense_lm(seed=2)
    moe = btx([a, b], BTXConfig(k=1))
    experts = moe.layers[1].mlp.experts
    for e, src in enumerate((a, b)):
        mlp = src.layers[1].mlp
        assert torch.equal(experts.gate_up_proj[e, :48], mlp.gate_proj.weight)
        assert torch.equal(experts.gate_up_proj[e, 48:], mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)
    q = (a.layers[0].self_attn.q_proj.weight + b.layers[0].self_attn.q_proj.weight) / 2
    torch.testing.assert_close(moe.layers[0].self_attn.q_proj.weight, q)
    torch.testing.assert_close(moe.embed_tokens.weight, (a.embed_tokens.weight + b.embed_tokens.weight) / 2)
    # a token whose router picks expert e (k=1) gets exactly branch e's FFN of its (averaged-model) input
    mlp = moe.layers[0].mlp
    h = torch.randn(5, 32)
    y, r = mlp(h[None])
    want = torch.stack([(a, b)[int(e)].layers[0].mlp(h[i]) for i, e in enumerate(r.expert_ids[:, 0])])
    torch.testing.assert_close(y[0], want, atol=1e-6, rtol=1e-5)


def test_gradients_reach_the_router():
    moe = btx([dense_lm(seed=1), dense_lm(seed=2)], BTXConfig(k=1)).train()
    out = moe(IDS, targets=IDS)
    (out.loss + out.aux_loss).backward()
    assert moe.layers[0].mlp.router.weight.grad.abs().sum() > 0
    assert "load_balance" in out.routings[0].aux


def test_branches_must_share_architecture_and_seed():
    with pytest.raises(ValueError, match="model 1 has another architecture than model 0 .*ffn_hidden: 48 vs 64"):
        btx([dense_lm(), dense_lm(ffn_hidden=64)])
    with pytest.raises(ValueError, match="at least 2 branches"):
        btx([dense_lm()])
    with pytest.raises(ValueError, match=r"BTXConfig.k must be in \[1, number of branches=2\]"):
        btx([dense_lm(), dense_lm()], BTXConfig(k=3))
    with pytest.raises(ValueError, match="router_std must be a finite number >= 0"):
        BTXConfig(router_std=-1.0)
    m = dense_lm()
    runs = [DenseSource(m, f"run {i}", {"init": s}, Path(f"/r{i}")) for i, s in enumerate(["/s/a", "/s/a"])]
    assert check_one_seed(runs) == str(Path("/s/a").resolve())
    runs[1].meta["init"] = "/s/b"
    with pytest.raises(ValueError, match="must be trained from one seed .*run 1: /s/b"):
        check_one_seed(runs)
    runs[1].meta.pop("init")
    with pytest.raises(ValueError, match="run 1: no seed"):
        check_one_seed(runs)
    assert check_one_seed([DenseSource(m, "model"), DenseSource(m, "model")]) is None
