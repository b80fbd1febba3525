"""The methods: each a function returning the `AdaptConfig` its paper describes, registered by name (one file
each). `method_config(name, **overrides)` builds one; `list_methods()` names them with a line each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.adapt.config import AdaptConfig
from moekit.utils.registry import Registry

METHODS: Registry[Callable[..., AdaptConfig]] = Registry("adapt method")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def register_method(name: str) -> Callable[[Callable[..., AdaptConfig]], Callable[..., AdaptConfig]]:
    """Register a method function (keyword-only: targets, num_experts, rank, k, alpha; None = its default)."""
    return METHODS.register(name)


def _ensure_builtin() -> None:
    from moekit.adapt.methods import hydralora, lora, loramoe, mixlora, mixlora_proj, smora  # noqa: F401


def method_config(name: str, **overrides: Any) -> AdaptConfig:
    """The AdaptConfig of method `name` with the given overrides (None values keep the method's default)."""
    _ensure_builtin()
    return METHODS.get(name)(**{k: v for k, v in overrides.items() if v is not None})


def list_methods() -> dict[str, str]:
    """name -> the first line of the method's docstring."""
    _ensure_builtin()
    return {n: (METHODS.get(n).__doc__ or "").strip().splitlines()[0] for n in METHODS.list()}
