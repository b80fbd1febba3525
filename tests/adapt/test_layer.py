"""LoRAExperts against hand computation and a per-token reference loop, gradients included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.adapt import LoRAExperts


def make(kind: str = "experts", num_experts: int = 4, rank: int = 4, router: str | None = "topk",
         router_args: dict | None = None, seed: int = 0) -> LoRAExperts:
    torch.manual_seed(seed)
    layer = LoRAExperts(base=nn.Linear(12, 10), kind=kind, num_experts=num_experts, rank=rank, alpha=8.0,
                        router=router, router_args=router_args if router_args is not None else {"k": 2})
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


def reference(layer: LoRAExperts, x: torch.Tensor) -> torch.Tensor:
    """A token-by-token loop over the router's chosen slots."""
    routing = layer.router(x)
    rows = []
    for t in range(x.shape[0]):
        y = layer.base(x[t])
        for slot in range(routing.expert_ids.shape[1]):
            e, w = int(routing.expert_ids[t, slot]), routing.weights[t, slot]
            if e < 0:
                continue
            if layer.kind == "ranks":
                a, b = layer.lora_A[0, e], layer.lora_B[0, :, e]  # rank e: A row [in], B column [out]
                y = y + w * layer.scaling * b * (a @ x[t])
            else:
                a = layer.lora_A[0 if layer.kind == "shared_a" else e]
                y = y + w * layer.scaling * (layer.lora_B[e] @ (a @ x[t]))
        rows.append(y)
    return torch.stack(rows)


def test_one_expert_pass_through_router_equals_plain_lora_by_hand():
    plain = make(num_experts=1, router=None)
    routed = make(num_experts=1, router="topk", router_args={"k": 1})
    routed.load_state_dict({**routed.state_dict(), **{k: v for k, v in plain.state_dict().items()}})
    x = torch.randn(7, 12)
    by_hand = x @ plain.base.weight.T + plain.base.bias + 2.0 * (x @ plain.lora_A[0].T) @ plain.lora_B[0].T
    torch.testing.assert_close(plain(x), by_hand)
    torch.testing.assert_close(routed(x), by_hand)
    assert plain.mergeable and not routed.mergeable
    torch.testing.assert_close(x @ plain.merged_weight().T + plain.base.bias, by_hand)


@pytest.mark.parametrize("kind,router,router_args", [
    ("experts", "topk", {"k": 2}), ("shared_a", "topk", {"k": 4}), ("ranks", "topk", {"k": 2, "normalize": False}),
    ("experts", "topp", {"p": 0.5}),  # a variable number of experts per token: empty slots are -1
])
def test_mixture_matches_reference_loop_with_gradients(kind, router, router_args):
    layer = make(kind=kind, router=router, router_args=router_args)
    x = torch.randn(6, 12)
    fast = layer(x)
    layer.zero_grad()
    g_out = torch.randn_like(fast)
    (fast * g_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    slow = reference(layer, x)
    (slow * g_out).sum().backward()
    torch.testing.assert_close(fast, slow)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, msg=n)
    assert grads["router.weight"].abs().sum() > 0 and grads["lora_A"].abs().sum() > 0
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_shapes_and_stored_routing():
    layer = make(kind="ranks", rank=6, router_args={"k": 3})
    assert layer.lora_A.shape == (1, 6, 12) and layer.lora_B.shape == (1, 10, 6) and layer.num_experts == 6
    y = layer(torch.randn(2, 5, 12))
    assert y.shape == (2, 5, 10)
    assert layer.last_routing.expert_ids.shape == (10, 3)
    hydra = make(kind="shared_a", num_experts=3, router_args={"k": 3})
    assert hydra.lora_A.shape == (1, 4, 12) and hydra.lora_B.shape == (3, 10, 4)


def test_zero_b_is_the_base_layer():
    torch.manual_seed(0)
    layer = LoRAExperts(base=nn.Linear(12, 10), kind="experts", num_experts=4, rank=4, alpha=8.0, router="topk",
                        router_args={"k": 2})
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), layer.base(x))


def test_rank_larger_than_layer_is_an_error():
    with pytest.raises(ValueError, match="rank=11 is larger than the layer"):
        LoRAExperts(base=nn.Linear(12, 10), kind="experts", num_experts=1, rank=11, alpha=1.0, router=None,
                    router_args={})
