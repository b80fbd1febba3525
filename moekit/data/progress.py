"""Progress display for long data work (`rich`), off when asked or when nothing long is happening."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True, log_path=False)


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with `message` while the block runs (for steps that report no progress of their own)."""
    if not enabled:
        yield
        return
    with _console.status(message):
        yield
    _console.log(f"{message} done")


def progress_bar(enabled: bool = True) -> Progress:
    """A `rich` progress bar on stderr; `disable=True` when not `enabled`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
        disable=not enabled,
        transient=False,
    )
