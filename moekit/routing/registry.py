"""The router registry: one way in (`register_router`), name -> class (CONVENTIONS 11), on `moekit.utils.registry`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from moekit.utils.registry import Registry

ROUTERS: Registry[type[nn.Module]] = Registry("router")

R = TypeVar("R", bound=type[nn.Module])


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator: register a router class under `name` (unique) and set its `router_name`."""

    def deco(cls: R) -> R:
        ROUTERS.register(name)(cls)
        cls.router_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _ensure_builtin() -> None:
    # Importing the package registers every built-in router (one file each).
    import moekit.routing  # noqa: F401


def list_routers() -> list[str]:
    """Names of every registered router, sorted."""
    _ensure_builtin()
    return ROUTERS.list()


def get_router(name: str) -> type[nn.Module]:
    """The router class registered under `name`; an unknown name lists the known ones (a KeyError)."""
    _ensure_builtin()
    return ROUTERS.get(name)


def build_router(name: str, **kwargs: Any) -> nn.Module:
    """Construct the router `name` with keyword arguments (`dim`, `num_experts`, and its own)."""
    cls = get_router(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        known = sorted(p for p in params if p != "self")
        raise TypeError(f"router {name!r} got unknown arguments {unknown}; it accepts {known}")
    return cls(**kwargs)


def router_config(router: nn.Module) -> dict[str, Any]:
    """JSON-ready config of a router: {"name": ..., "args": {...}}.

    Every constructor argument is read back from the attribute of the same name, so each router
    stores its arguments under their own names (the contract test checks the round trip).
    """
    name = getattr(type(router), "router_name", None)
    if name is None:
        raise TypeError(f"{type(router).__name__} is not a registered router")
    args = {}
    for p in inspect.signature(type(router).__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(router, p.name):
            raise AttributeError(f"router {name!r} does not store its argument {p.name!r}")
        args[p.name] = getattr(router, p.name)
    return {"name": name, "args": args}


def router_from_config(config: dict[str, Any]) -> nn.Module:
    """Inverse of `router_config`."""
    return build_router(config["name"], **config.get("args", {}))
