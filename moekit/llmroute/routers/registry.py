"""Router registry: a name -> class map with one way in (`register`), and `get` / `create` / `list_routers`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.llmroute.routers.base import Router

_ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    """Class decorator: register a `Router` subclass under `name` (and set its `name`)."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered by {_ROUTERS[name].__name__}")
        cls.name = name
        _ROUTERS[name] = cls
        return cls

    return wrap


def get(name: str) -> type[Router]:
    """The router class registered as `name`; an unknown name raises listing the known ones."""
    if name not in _ROUTERS:
        raise KeyError(f"unknown router {name!r}; known routers: {list_routers()}")
    return _ROUTERS[name]


def create(name: str, **args) -> Router:
    """A new, unfitted router `name` built with keyword arguments `args`."""
    return get(name)(**args)


def list_routers() -> list[str]:
    """Names of all registered routers, sorted."""
    return sorted(_ROUTERS)
