"""Atomic file writes: write to a temporary name in the same folder, then rename into place.

Folders are swapped with `replace_dir` (two renames) and put back in order after a crash with `recover_dir`;
`folder_lock` tells a live writer from the leftovers of a killed one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and rename the result to `path`; a crash never leaves a partial file. The file
    gets the permissions a plain `open(path, "w")` would give (mkstemp's temporary file is owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = str(path)  # e.g. ENOSPC from write(): say which file
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically (the copy appears whole or not at all)."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_save_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """Write numpy arrays to an .npz atomically (never pickled: object arrays are refused)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez would append .npz to it
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}, allow_pickle=False)

    atomic_write(path, write)


def old_dir(final: str | Path) -> Path:
    """Where `replace_dir` keeps the previous copy of `final` between its two renames: `final.old`."""
    final = Path(final)
    return final.with_name(final.name + ".old")


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place: `final` -> `final.old`, `tmp_dir` -> `final`, remove `final.old`.

    A whole copy exists at every moment: at `final`, or, only between the two renames, at `final.old`,
    which `recover_dir` renames back. `final.old` is only ever deleted while `final` exists."""
    final = Path(final)
    recover_dir(final)
    if final.exists():
        os.replace(final, old_dir(final))
    os.replace(tmp_dir, final)
    recover_dir(final)


def recover_dir(final: str | Path) -> None:
    """Finish or undo a `replace_dir` that was interrupted (a no-op when there is nothing to do).

    `final.old` without `final`: killed between the renames, so the old copy is the only one: rename it back.
    Both: the new copy is in place and the old one (perhaps half deleted) is removed."""
    final = Path(final)
    old = old_dir(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        os.replace(old, final)


@contextmanager
def folder_lock(path: str | Path, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive advisory lock on the folder `path` while the block runs.

    Yields True when held, False when another process still holds it after `wait_s` seconds. The lock is
    an flock on the folder itself, so nothing is written and a killed process never leaves a stale lock.
    Where flock is missing (Windows) it always yields True: there is then no protection from a second process."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX CI
        yield True
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)  # releases the lock
