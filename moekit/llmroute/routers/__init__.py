"""Query routers over whole LLMs, one per file, registered by name (`get`, `create`, `list_routers`)."""

from moekit.llmroute.routers import (  # noqa: F401  (registers every router)
    best,
    carrot,
    cascade,
    category,
    ensemble,
    flags,
    knn,
    mf,
    mlp,
    oracle,
    policy,
    random,
    threshold,
    zero,
)
from moekit.llmroute.routers.base import Prediction, Router, load_router
from moekit.llmroute.routers.registry import create, get, list_routers, register

__all__ = ["Prediction", "Router", "create", "get", "list_routers", "load_router", "register"]
