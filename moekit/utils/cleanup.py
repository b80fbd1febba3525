"""A failed command removes what it created, and only that."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass  # cleaning up must never hide the error that caused it


@contextmanager
def undo_on_failure(folder: str | os.PathLike, *, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Run the block; if it raises, remove every entry it added directly under `folder` (temporary
    `.name` entries always; others unless `keep(path)` says they are worth keeping, such as a complete
    checkpoint), then `folder` and the parents the block created, when they are left empty. Entries that
    existed before are never touched. An OSError without a file name gets `folder` as its file name, so
    the error says where the write failed."""
    folder = Path(folder)
    top = folder  # the highest folder on the way to `folder` that does not exist yet (None: all exist)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    created = None if folder.exists() else top
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        yield folder
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = str(folder)
        if folder.is_dir():
            for name in sorted(set(os.listdir(folder)) - before):
                p = folder / name
                if name.startswith(".") or keep is None or not keep(p):
                    _remove(p)
        if created is not None:
            d = folder
            while d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                if d == created:
                    break
                d = d.parent
        raise
