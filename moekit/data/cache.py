"""The on-disk cache: where it lives, how entries are keyed, and atomic writes (temporary name, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moekit.utils.io import atomic_write, atomic_write_text

ENV_VAR = "MOEKIT_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else `$MOEKIT_CACHE`, else `~/.cache/moekit`. Nothing is created here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moekit"


def cache_key(obj: object) -> str:
    """Short stable hash of a JSON-serialisable description (sources, settings, versions)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """`atomic_write` with `write(binary_file)`."""

    def to_tmp(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write_text(path, text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    _write_atomic(Path(path), lambda f: np.save(f, array, allow_pickle=False))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it becomes `final` by one rename.

    On any error (or Ctrl-C) the temporary directory is removed, so a half-built entry is never seen.
    If another process finished the same entry first, its copy is kept and ours is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
