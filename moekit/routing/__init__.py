"""Routers (one per file), their base class `Router`, the `Routing` contract, the registry and the auxiliary
losses."""

import importlib
import pkgutil

from moekit.routing.base import Router
from moekit.routing.registry import (
    build_router,
    get_router,
    list_routers,
    register_router,
    router_config,
    router_from_config,
)
from moekit.routing.routing import Routing, RoutingContext

# Every module of the package is imported, so each router registers itself: adding a router is adding
# its file (no list to edit here).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "Router",
    "Routing",
    "RoutingContext",
    "build_router",
    "get_router",
    "list_routers",
    "register_router",
    "router_config",
    "router_from_config",
]
