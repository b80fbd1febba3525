"""Routers (one per file), their base class `Router`, the `Routing` contract, the registry and the auxiliary
losses."""

from moekit.routing.base import Router
from moekit.routing.registry import (
    build_router,
    get_router,
    list_routers,
    register_router,
    router_config,
    router_from_config,
)
from moekit.routing.routing import Routing

# Built-in routers register themselves on import.
from moekit.routing import topk  # noqa: E402,F401  isort: skip
from moekit.routing import switch  # noqa: E402,F401  isort: skip
from moekit.routing import expert_choice  # noqa: E402,F401  isort: skip
from moekit.routing import deepseek  # noqa: E402,F401  isort: skip
from moekit.routing import topp  # noqa: E402,F401  isort: skip
from moekit.routing import null_experts  # noqa: E402,F401  isort: skip
from moekit.routing import hash  # noqa: E402,F401  isort: skip
from moekit.routing import random_router  # noqa: E402,F401  isort: skip
from moekit.routing import attention  # noqa: E402,F401  isort: skip
from moekit.routing import recurrent  # noqa: E402,F401  isort: skip
from moekit.routing import mixture_of_routers  # noqa: E402,F401  isort: skip
from moekit.routing import stochastic  # noqa: E402,F401  isort: skip
from moekit.routing import smoe_dropout  # noqa: E402,F401  isort: skip
from moekit.routing import moec  # noqa: E402,F401  isort: skip
from moekit.routing import graph_of_tokens  # noqa: E402,F401  isort: skip
from moekit.routing import prototype  # noqa: E402,F401  isort: skip
from moekit.routing import uncertainty  # noqa: E402,F401  isort: skip
from moekit.routing import smear  # noqa: E402,F401  isort: skip
from moekit.routing import autonomy  # noqa: E402,F401  isort: skip

__all__ = [
    "Router",
    "Routing",
    "build_router",
    "get_router",
    "list_routers",
    "register_router",
    "router_config",
    "router_from_config",
]
