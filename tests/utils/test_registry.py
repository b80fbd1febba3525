"""The one registry helper, and the four registries built on it (routers, backends, experts variants, LLM routers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moekit.layers import dispatch, variants
from moekit.layers.dispatch import get_backend, list_backends, register_backend
from moekit.llmroute import routers as llm_routers
from moekit.routing import get_router, list_routers, register_router
from moekit.routing import registry as router_registry
from moekit.utils.registry import Registry, UnknownNameError


def test_register_get_list_and_contains():
    reg: Registry = Registry("widget")

    @reg.register("round")
    def round_widget():
        return "r"

    reg.register("flat")(str)
    assert reg.get("round") is round_widget and reg.get("flat") is str
    assert reg.list() == ["flat", "round"] and list(reg) == ["flat", "round"] and len(reg) == 2
    assert "round" in reg and "square" not in reg and ["unhashable"] not in reg
    reg.register("round")(round_widget)  # the same object again: a no-op
    assert reg.list() == ["flat", "round"]


def test_duplicate_name_is_an_error_naming_both():
    reg: Registry = Registry("widget")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="widget name 'a' is already registered to int; cannot register float"):
        reg.register("a")(float)
    assert reg.get("a") is int
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")


def test_unknown_name_lists_the_known_ones_as_key_and_value_error():
    reg: Registry = Registry("widget")
    reg.register("b")(int)
    reg.register("a")(int)
    with pytest.raises(UnknownNameError) as info:
        reg.get("c")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value) == "unknown widget 'c'; known widgets: a, b"  # not quoted, as KeyError would
    with pytest.raises(UnknownNameError, match="unknown widget"):
        reg.get(["unhashable"])


def test_register_backend_rejects_a_taken_name():
    """Before the shared registry, a second `register_backend("loop")` silently replaced the loop backend."""
    loop = get_backend("loop")
    with pytest.raises(ValueError, match="dispatch backend name 'loop' is already registered"):
        register_backend("loop")(lambda x, ids, w, experts: x)
    with pytest.raises(ValueError, match="'auto' is already registered"):
        register_backend("auto")(lambda x, ids, w, experts: x)
    assert get_backend("loop") is loop and list_backends() == ["auto", "eager", "grouped", "loop"]


def test_the_four_registries_share_one_api():
    assert dispatch.BACKENDS.list() == list_backends()
    assert router_registry.ROUTERS.list() == list_routers()
    assert variants.EXPERTS_VARIANTS.list() == ["autonomy", "duo", "ffn", "film", "hecto", "lowrank", "qat", "smear"]
    assert llm_routers.registry.ROUTERS.list() == llm_routers.list_routers()
    for reg, kind in ((dispatch.BACKENDS, "dispatch backend"), (router_registry.ROUTERS, "router"),
                      (variants.EXPERTS_VARIANTS, "experts variant"), (llm_routers.registry.ROUTERS, "router")):
        with pytest.raises(UnknownNameError, match=f"unknown {kind} 'nope'; known {kind}s: "):
            reg.get("nope")
    with pytest.raises(ValueError, match="known experts variants: autonomy, duo, ffn"):
        variants.build_experts("nope", num_experts=2, dim=4, hidden=4)
    with pytest.raises(KeyError, match="known routers: .*knn"):
        llm_routers.get("nope")


def test_router_registration_sets_the_name_and_rejects_duplicates():
    topk = get_router("topk")
    assert topk.router_name == "topk"
    with pytest.raises(ValueError, match="router name 'topk' is already registered"):
        register_router("topk")(type("Other", (topk,), {}))
    assert get_router("topk") is topk and topk.router_name == "topk"
    with pytest.raises(ValueError, match="router name 'knn' is already registered"):
        llm_routers.register("knn")(type("Other", (llm_routers.Router,), {}))
    assert llm_routers.get("knn").name == "knn"


def test_llmroute_registry_imports_no_torch():
    code = "import sys, moekit.llmroute.routers as r; r.create('knn'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
