"""After patching: swap the router by name, read routings and auxiliary losses, change the expert
set and save it with the config updated."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit.hf as mh
from moekit.layers import keep_experts
from moekit.routing import Routing
from tests.hf.tiny import tiny_model


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_routings_and_aux_loss_for_fine_tuning():
    model = mh.patch(tiny_model("olmoe").train(), router_args={"z_loss": 1e-3})
    loss = model(ids(), labels=ids()).loss
    rs = mh.routings(model)
    assert len(rs) == 2 and all(isinstance(r, Routing) for r in rs)
    assert rs[0].expert_ids.shape == (20, 2) and rs[0].logits.shape == (20, 8)
    assert set(rs[0].aux) == {"load_balance", "z_loss"}  # load_balance from config.router_aux_loss_coef
    assert rs[0].aux["load_balance"] > 0 and rs[0].aux["z_loss"] > 0
    aux = mh.aux_loss(model)
    torch.testing.assert_close(aux, sum(r.total_aux() for r in rs))
    (loss + aux).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_swap_router_by_name_shares_the_gate_and_unpatch_restores():
    ref = tiny_model("olmoe")
    model = copy.deepcopy(ref)
    gate = model.model.layers[0].mlp.gate.weight
    mh.patch(model, router="topp", router_args={"p": 0.6, "max_k": 4})
    layer = model.model.layers[0].mlp
    assert type(layer.moe.router).router_name == "topp" and layer.moe.router.weight is gate
    with torch.no_grad():
        out = model(ids()).logits
    r = mh.routings(model)[0]
    assert r.expert_ids.shape == (20, 4) and (r.expert_ids == -1).any()  # variable experts per token
    assert "dynamic" in r.aux
    with torch.no_grad():
        assert not torch.allclose(out, ref(ids()).logits)
    with pytest.raises(mh.NotExpressible, match="topp"):
        mh.save(model, "/nonexistent/never-written")
    mh.patch(model)  # back to the family's own routing (re-patching unpatches first)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, atol=1e-5, rtol=0)
    mh.unpatch(model)
    assert type(model.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock"


def test_routers_that_route_by_token_id_get_the_input_ids():
    model = mh.patch(tiny_model("qwen2_moe"), router="hash", router_args={"k": 2})
    x = ids()
    with torch.no_grad():
        model(x)
    first = mh.routings(model)[0].expert_ids.reshape(2, 10, 2)
    same = x[:, :, None] == x[:, None, :]  # equal tokens -> equal experts
    for b in range(2):
        i, j = torch.where(same[b])
        assert torch.equal(first[b, i], first[b, j])
    with torch.no_grad():  # cached decoding: the hook passes the new token ids only
        out = model(x[:, :4], use_cache=True)
        model(x[:, 4:5], past_key_values=out.past_key_values, use_cache=True)
    assert mh.routings(model)[0].expert_ids.shape == (2, 2)
    mh.unpatch(model)
    assert not model._forward_pre_hooks


def test_native_router_with_a_changed_argument_is_not_expressible():
    model = mh.patch(tiny_model("mixtral"), router_args={"normalize": False})
    with pytest.raises(mh.NotExpressible, match="normalize"):
        mh.save(model, "/nonexistent/never-written")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_save_with_a_changed_expert_set_updates_the_config(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = mh.patch(tiny_model(family), router_args={"k": 3})
    for layer in mh.patched_layers(model):  # what an expert-pruning method does
        if family == "deepseek_v3":  # 6 experts in 2 groups of 3
            keep_experts(layer, [0, 1, 2, 3, 5, 6], router_args={"n_group": 2, "topk_group": 1})
        else:
            keep_experts(layer, [0, 2, 3, 5, 6, 7])
    x = ids(1)
    with torch.no_grad():
        want = model(x).logits
    mh.save(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    cfg = loaded.config
    assert cfg.num_experts_per_tok == 3
    assert (cfg.n_routed_experts if family == "deepseek_v3" else cfg.num_experts) == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, atol=1e-5, rtol=0)
    mh.unpatch(model)  # the original blocks now hold the pruned tensors
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)


def test_layers_that_disagree_cannot_be_saved(tmp_path):
    model = mh.patch(tiny_model("olmoe"))
    mh.patched_layers(model)[1].moe.router.k = 3
    with pytest.raises(mh.NotExpressible, match="layer 1"):
        mh.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_docs_example(tmp_path):
    """docs/hf.md "Patch OLMoE, swap its router, save it", on a tiny OLMoE."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("olmoe")
    input_ids = ids()
    with torch.no_grad():
        want = model(input_ids).logits
    mh.patch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, want, atol=1e-5, rtol=0)
    assert [r.expert_ids.shape for r in mh.routings(model)] == [(20, 2), (20, 2)]
    mh.patch(model, router="topp", router_args={"p": 0.5, "max_k": 8})
    model.train()
    out = model(input_ids, labels=input_ids)
    aux = mh.aux_loss(model)
    assert set(mh.routings(model)[0].aux) == {"load_balance", "dynamic"}
    (out.loss + aux).backward()
    model.eval()
    mh.patch(model, router_args={"k": 4})
    mh.save(model, tmp_path / "olmoe-top4")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "olmoe-top4", experts_implementation="eager").eval()
    assert again.config.num_experts_per_tok == 4
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)
    mh.unpatch(model)
    assert type(model.model.layers[0].mlp).__name__ == "OlmoeSparseMoeBlock"
    assert model.config.num_experts_per_tok == 4 and model.model.layers[0].mlp.gate.top_k == 4
