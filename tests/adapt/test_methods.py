"""MixLoRA's block experts, the sparse path against the dense one, and LoRAMoE's localized balancing constraint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moekit.adapt import (
    AdaptConfig,
    LoRAExperts,
    LoRAFFNExperts,
    adapted_layers,
    attach,
    finetune,
    localized_balance_loss,
    method_config,
    set_sample_groups,
)
from tests.adapt.tiny import randomize_b, tiny_llama, tiny_moekit

pytest.importorskip("transformers")
IDS = torch.tensor([[5, 9, 17, 33, 4, 61, 8, 12], [3, 3, 40, 22, 50, 11, 6, 1]])
FFN = ["gate_proj", "up_proj", "down_proj"]


def llama_mlp(bias: bool = True) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=12, intermediate_size=20, num_attention_heads=4, mlp_bias=bias, hidden_act="silu")
    return tf.models.llama.modeling_llama.LlamaMLP(cfg)


def block(num_experts: int = 4, router_args: dict | None = None, bias: bool = True) -> LoRAFFNExperts:
    layer = LoRAFFNExperts(base=llama_mlp(bias), num_experts=num_experts, rank=3, alpha=6.0, router="topk",
                           router_args=router_args or {"k": 2})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def block_reference(layer: LoRAFFNExperts, x: torch.Tensor) -> torch.Tensor:
    """Token by token, chosen expert by chosen expert: the expert FFN with W + s B_e A_e on each projection."""
    routing = layer.router(x)
    base, s = layer.base, layer.scaling

    def proj(name, e, v):
        lin, lora = getattr(base, name), getattr(layer, name)
        w = lin.weight + s * lora.lora_B[e] @ lora.lora_A[e]
        return v @ w.T + (lin.bias if lin.bias is not None else 0)

    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for slot in range(routing.expert_ids.shape[1]):
            e, w = int(routing.expert_ids[t, slot]), routing.weights[t, slot]
            if e >= 0:
                h = base.act_fn(proj("gate_proj", e, x[t])) * proj("up_proj", e, x[t])
                y = y + w * proj("down_proj", e, h)
        rows.append(y)
    return torch.stack(rows)


def grads_of(module: nn.Module, fn, x: torch.Tensor, g_out: torch.Tensor):
    module.zero_grad()
    y = fn(x)
    (y * g_out).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("router_args", [{"k": 2}, {"k": 1}, {"k": 4}])
def test_ffn_block_dense_and_sparse_match_the_reference_loop_with_gradients(router_args):
    layer = block(router_args=router_args)
    x = torch.randn(6, 12)
    g_out = torch.randn(6, 12)
    ref, g_ref = grads_of(layer, lambda v: block_reference(layer, v), x, g_out)
    for path in (layer.forward_dense, layer.forward_sparse, layer.forward_grouped):
        y, g = grads_of(layer, lambda v, path=path: path(v, layer.router(v)), x, g_out)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-5, msg=n)
    assert g_ref["router.weight"].abs().sum() > 0 and g_ref["down_proj.lora_A"].abs().sum() > 0
    assert not layer.base.up_proj.weight.requires_grad


def test_one_expert_block_equals_plain_lora_on_the_three_projections():
    for base in (tiny_llama(), tiny_moekit()):
        ids = IDS % 64
        mix = attach(copy.deepcopy(base), method_config("mixlora", num_experts=1, k=1, rank=4, attention=False))
        plain = attach(copy.deepcopy(base), method_config("lora", targets=FFN, rank=4))
        randomize_b(mix)
        layers = dict(adapted_layers(plain))
        with torch.no_grad():
            for name, layer in adapted_layers(mix):
                for p in FFN:
                    layers[f"{name}.{p}"].lora_A.copy_(getattr(layer, p).lora_A)
                    layers[f"{name}.{p}"].lora_B.copy_(getattr(layer, p).lora_B)
        out = mix(ids).logits
        assert not torch.allclose(out, base(ids).logits, atol=1e-3)
        torch.testing.assert_close(out, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_mixlora_layout_aux_loss_and_errors():
    model = attach(tiny_llama(), method_config("mixlora", num_experts=4, k=2, rank=4))
    kinds = {n: type(layer).__name__ for n, layer in adapted_layers(model)}
    assert kinds["model.layers.0.mlp"] == "LoRAFFNExperts" and kinds["model.layers.0.self_attn.q_proj"] == "LoRAExperts"
    assert len(kinds) == 2 + 8 and model.model.layers[1].mlp.router.k == 2
    randomize_b(model)
    with torch.no_grad():
        gathered = model(IDS).logits  # 16 tokens x 2 slots: the gather path
        for _, layer in adapted_layers(model):
            layer.sparse_max_slots = 0  # now the grouped path, as for a training batch
        torch.testing.assert_close(model(IDS).logits, gathered, atol=1e-5, rtol=1e-5)
    model.train()
    out = model(IDS, labels=IDS)
    lb = [layer.last_aux["load_balance"] for _, layer in adapted_layers(model) if layer.router is not None]
    assert len(lb) == 2
    torch.testing.assert_close(out.adapter_aux_loss, sum(lb))
    with pytest.raises(ValueError, match="'mlp' matches no feed-forward block"):
        attach(nn.Sequential(nn.Linear(4, 4)), method_config("mixlora"))
    with pytest.raises(TypeError, match="base must be an MLP block"):
        LoRAFFNExperts(base=nn.Linear(4, 4), num_experts=2, rank=1, alpha=1.0, router="topk", router_args={"k": 1})


@pytest.mark.parametrize("kind,router_args", [("experts", {"k": 2}), ("shared_a", {"k": 1}),
                                              ("experts", {"k": 3, "normalize": False})])
def test_sparse_path_equals_dense_path_with_gradients(kind, router_args):
    torch.manual_seed(0)
    layer = LoRAExperts(base=nn.Linear(12, 10), kind=kind, num_experts=4, rank=4, alpha=8.0, router="topk",
                        router_args=router_args)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x, g_out = torch.randn(7, 12), torch.randn(7, 10)
    from moekit.adapt.layer import dense_gates

    dense, g_dense = grads_of(layer, lambda v: layer.delta_dense(v, dense_gates(layer.router(v), 4)), x, g_out)
    paths = [layer.delta_sparse] + ([layer.delta_grouped] if kind == "experts" else [])
    for path in paths:
        sparse, g_sparse = grads_of(layer, lambda v, path=path: path(v, layer.router(v)), x, g_out)
        torch.testing.assert_close(sparse, dense)
        for n in g_dense:
            torch.testing.assert_close(g_sparse[n], g_dense[n], msg=n)


def test_forward_takes_the_gather_path_for_few_tokens_and_the_grouped_one_for_many(monkeypatch):
    layer = LoRAExperts(base=nn.Linear(12, 10), kind="experts", num_experts=4, rank=2, alpha=2.0, router="topk",
                        router_args={"k": 2})
    calls = []
    for name in ("delta_dense", "delta_sparse", "delta_grouped"):
        orig = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda *a, name=name, orig=orig: calls.append(name) or orig(*a))
    layer(torch.randn(1, 3, 12))  # 6 slots: generation-sized
    layer(torch.randn(2, 100, 12))  # 400 slots > sparse_max_slots
    soft = LoRAExperts(base=nn.Linear(12, 10), kind="experts", num_experts=4, rank=2, alpha=2.0, router="topk",
                       router_args={"k": 4})
    monkeypatch.setattr(soft, "delta_sparse", lambda *a: pytest.fail("a soft router must take the dense path"))
    soft(torch.randn(1, 2, 12))
    assert calls == ["delta_sparse", "delta_grouped"]


def test_localized_balance_loss_by_hand():
    # 2 samples x 2 tokens x 4 experts; experts {0, 1} form group 0, {2, 3} group 1; sample 0 is type 0, 1 type 1
    gates = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.2, 0.2]],
                          [[0.25, 0.25, 0.25, 0.25], [0.0, 0.2, 0.3, 0.5]]])
    # Q[n, m] = sum over tokens: sample 0 -> [0.5, 0.8, 0.4, 0.3]; sample 1 -> [0.25, 0.45, 0.55, 0.75]
    # Z = Q * (1.1 on own group, 0.9 else): [0.55, 0.88, 0.36, 0.27] and [0.225, 0.405, 0.605, 0.825]
    z = [0.55, 0.88, 0.36, 0.27, 0.225, 0.405, 0.605, 0.825]
    mean = sum(z) / 8
    var = sum((v - mean) ** 2 for v in z) / 8
    got = localized_balance_loss(gates, torch.tensor([0, 1]), groups=2, delta=0.1)
    torch.testing.assert_close(got, torch.tensor(var / mean))
    uniform = localized_balance_loss(torch.full((3, 5, 4), 0.25), torch.tensor([0, 1, 1]), groups=2, delta=0.0)
    assert float(uniform) == 0.0  # equal importance everywhere, no coefficients: nothing to balance
    with pytest.raises(ValueError, match="sample_groups must be \\[M=2\\]"):
        localized_balance_loss(gates, torch.tensor([0, 1, 0]), groups=2, delta=0.1)
    with pytest.raises(ValueError, match="sample groups must lie in \\[0, 2\\)"):
        localized_balance_loss(gates, torch.tensor([0, 2]), groups=2, delta=0.1)


def test_loramoe_aux_loss_in_training_and_errors():
    model = attach(tiny_llama(), method_config("loramoe", num_experts=4, rank=2))
    layers = dict(adapted_layers(model))
    assert len(layers) == 6 and all(layer.router.k == 4 for layer in layers.values())  # soft over all experts
    model.eval()
    assert model(IDS).get("adapter_aux_loss") is None  # no constraint outside training
    model.train()
    with pytest.raises(ValueError, match="call moekit.adapt.set_sample_groups"):
        model(IDS)
    groups = torch.tensor([0, 1])
    set_sample_groups(model, groups)
    out = model(IDS, labels=IDS)
    by_hand = sum(0.1 * localized_balance_loss(torch.softmax(layer.last_routing.logits.float(), -1).reshape(2, 8, 4),
                                               groups, groups=2, delta=0.1) for layer in layers.values())
    torch.testing.assert_close(out.adapter_aux_loss, by_hand)
    out.adapter_aux_loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in layers.values())
    with pytest.raises(ValueError, match="groups must be a LongTensor"):
        set_sample_groups(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expert_groups must be an integer in \\[1, 4\\]"):
        AdaptConfig(num_experts=4, router="topk", expert_groups=5)
    with pytest.raises(ValueError, match="balance_delta must be a number in \\[0, 1.0\\)"):
        AdaptConfig(num_experts=4, router="topk", balance_delta=1.0)
    with pytest.raises(ValueError, match="localized_balance > 0 needs a router"):
        AdaptConfig(localized_balance=0.1)
    with pytest.raises(ValueError, match="k must be unset"):
        method_config("loramoe", num_experts=4, k=2)


def test_finetune_feeds_sample_groups_from_labels():
    class Source:
        def sample_batch(self, b, length, gen):
            x = torch.randint(3, 64, (b, length + 1), generator=gen)
            return x[:, :-1], x[:, 1:], torch.tensor([0, 1, 2, 3])[:b]

    model = attach(tiny_moekit(), method_config("loramoe", num_experts=4, rank=2))
    log = finetune(model, Source(), steps=2, batch_size=4, seq_len=8, lr=1e-2)
    assert len(log) == 2 and all(r["aux"] > 0 for r in log)  # the constraint reached the loss
    assert all(layer.sample_groups is None for _, layer in adapted_layers(model))  # cleared afterwards
