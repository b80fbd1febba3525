"""The typed routing context: what `MoE` and `MoELM` hand to routers, and what only experts get."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.layers import Experts, MoE
from moekit.layers.moe import experts_keywords
from moekit.models import LMConfig, MoELM
from moekit.routing import Routing, RoutingContext, build_router

D, E = 16, 4


class Spy(nn.Module):
    """Records what each call receives and routes every token to expert 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dim, self.num_experts, self.calls = D, E, []

    def forward(self, x: torch.Tensor, *, context: RoutingContext | None = None) -> Routing:
        self.calls.append(context)
        T = x.shape[0]
        return Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), torch.zeros(T, E), E)


class SeqExperts(Experts):
    """Experts that ask for `seq_len` and `layer` by naming them (and record what they got)."""

    def forward(self, x, routing, *, seq_len=None, layer=None):
        self.got = (seq_len, layer)
        return super().forward(x, routing)


def test_moe_sets_seq_len_and_flattens_token_ids():
    spy = Spy()
    moe = MoE(router=spy, experts=Experts(num_experts=E, dim=D, hidden=8))
    ids = torch.arange(10).reshape(2, 5)
    moe(torch.randn(2, 5, D), token_ids=ids)
    ctx = spy.calls[-1]
    assert ctx.seq_len == 5 and torch.equal(ctx.token_ids, ids.reshape(-1)) and ctx.previous is None
    given = RoutingContext(seq_len=5, token_ids=ids.reshape(-1))
    moe(torch.randn(2, 5, D), context=given)
    assert spy.calls[-1] is given  # nothing to change: the caller's context itself, no copy
    moe(torch.randn(7, D))
    assert spy.calls[-1] == RoutingContext()  # a [T, D] input: unknown sequences
    with pytest.raises(ValueError, match="token ids given twice"):
        moe(torch.randn(2, 5, D), context=given, token_ids=ids)


def test_cache_and_layer_reach_only_experts_that_name_them():
    assert experts_keywords(Experts) == ()
    assert experts_keywords(SeqExperts) == ("seq_len", "layer")
    spy = Spy()
    experts = SeqExperts(num_experts=E, dim=D, hidden=8)
    moe = MoE(router=spy, experts=experts)
    cache = object()
    moe(torch.randn(3, 4, D), cache=cache, layer=7)
    assert experts.got == (4, 7)  # seq_len and layer, not the cache it did not ask for
    assert set(RoutingContext.__slots__) == {"seq_len", "token_ids", "previous", "uncond", "token_index"}


def test_lm_builds_one_context_per_forward():
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, num_experts=4,
                   expert_hidden=16, router_args={"k": 2})
    model = MoELM(cfg)
    seen = []
    for block in model.layers:
        block.mlp.router.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["context"]), with_kwargs=True)
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    assert len(seen) == 3 and all(c is seen[0] for c in seen)  # the same object for every layer
    assert seen[0].seq_len == 8 and torch.equal(seen[0].token_ids, ids.reshape(-1))


def test_lm_hands_the_recurrent_state_to_the_next_layer():
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, num_experts=4,
                   expert_hidden=16, router="recurrent", router_args={"k": 2, "hidden": 8})
    model = MoELM(cfg)
    seen = []
    for block in model.layers:
        block.mlp.router.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["context"]), with_kwargs=True)
    out = model(torch.randint(0, 64, (2, 8)))
    assert seen[0].previous is None
    assert seen[1].previous is out.routings[0] and seen[2].previous is out.routings[1]
    router = build_router("recurrent", dim=D, num_experts=E, hidden=8)
    assert router.needs_previous and not build_router("topk", dim=D, num_experts=E).needs_previous
