"""Optional dependencies of `moekit.analyze`, checked in one place; each fails only when used."""

from __future__ import annotations

import importlib
from types import ModuleType

OPTIONAL = {
    "pyarrow": "pip install pyarrow  (or pip install 'moekit[data]')",
    "pyarrow.parquet": "pip install pyarrow  (or pip install 'moekit[data]')",
    "duckdb": "pip install duckdb  (or pip install 'moekit[analyze]')",
    "matplotlib": "pip install matplotlib  (or pip install 'moekit[data]')",
}


def require(name: str) -> ModuleType:
    """Import `name` or raise ImportError with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"moekit.analyze needs {name.split('.')[0]!r}: {OPTIONAL[name]}") from e
