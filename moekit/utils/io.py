"""Atomic file writes: write to a temporary name in the same folder, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and rename the result to `path`; a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = str(path)  # e.g. ENOSPC from write(): say which file
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one only after the new one exists."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old.exists():
        shutil.rmtree(old)
