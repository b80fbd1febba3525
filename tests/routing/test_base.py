"""Shared router helpers: the guarded renormalisation, softmax -> top-k, messages, module discovery."""

from __future__ import annotations

import pkgutil
import sys

import pytest
import torch

import moekit.routing
from moekit.routing import build_router, get_router, list_routers
from moekit.routing.base import renormalize, softmax_top_k, top_k
from moekit.routing.topk import TopKRouter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalize_equals_plain_division_and_guards_empty_rows(dtype):
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(64, 8) * 5, dim=-1).topk(3, dim=-1).values.to(dtype)
    assert torch.equal(renormalize(w), w / w.sum(dim=-1, keepdim=True))  # bit-identical where the sum is normal
    empty = torch.zeros(2, 3, dtype=dtype)
    assert torch.equal(renormalize(empty), empty)  # plain division: 0 / 0 = NaN
    assert torch.isnan(empty / empty.sum(dim=-1, keepdim=True)).all()


def test_softmax_top_k_is_the_three_steps():
    torch.manual_seed(1)
    logits = torch.randn(10, 6, dtype=torch.bfloat16)
    probs, w, ids = softmax_top_k(logits, 2, normalize=True)
    ref_p = torch.softmax(logits.float(), dim=-1)
    ref_w, ref_ids = torch.topk(ref_p, 2, dim=-1)
    assert probs.dtype == torch.float32 and torch.equal(probs, ref_p) and torch.equal(ids, ref_ids)
    assert torch.equal(w, ref_w / ref_w.sum(dim=-1, keepdim=True))
    assert torch.equal(top_k(ref_p, 2, normalize=False)[0], ref_w)


def test_messages_name_the_class_in_use():
    class MyRouter(TopKRouter):
        pass

    with pytest.raises(ValueError, match=r"^MyRouter: k must be"):
        MyRouter(dim=8, num_experts=4, k=9)
    with pytest.raises(ValueError, match=r"^MyRouter: order must be"):
        MyRouter(dim=8, num_experts=4, order="sideways")
    with pytest.raises(ValueError, match=r"^HashRouter: seed must be an integer"):
        build_router("hash", dim=8, num_experts=4, seed=1.5)


def test_every_router_module_is_discovered():
    """No import list to edit: every module of the package is imported, so its router registers."""
    names = {m.name for m in pkgutil.iter_modules(moekit.routing.__path__)}
    assert {"topk", "hash", "recurrent"} <= names
    assert all(f"moekit.routing.{n}" in sys.modules for n in names)
    modules = {get_router(r).__module__ for r in list_routers()}
    assert len(modules) == len(list_routers()) >= 19  # one router per file
