"""Router registry: a name -> class map with one way in (`register`), and `get` / `create` / `list_routers`,
on `moekit.utils.registry` (which imports no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moekit.utils.registry import Registry

if TYPE_CHECKING:
    from moekit.llmroute.routers.base import Router

ROUTERS: Registry[type[Router]] = Registry("router")


def register(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: register a `Router` subclass under `name` (unique) and set its `name`."""

    def wrap(cls: type[Router]) -> type[Router]:
        ROUTERS.register(name)(cls)
        cls.name = name
        return cls

    return wrap


def get(name: str) -> type[Router]:
    """The router class registered as `name`; an unknown name raises (a KeyError) listing the known ones."""
    return ROUTERS.get(name)


def create(name: str, **args: Any) -> Router:
    """A new, unfitted router `name` built with keyword arguments `args`."""
    return get(name)(**args)


def list_routers() -> list[str]:
    """Names of all registered routers, sorted."""
    return ROUTERS.list()
