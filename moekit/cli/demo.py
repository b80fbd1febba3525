"""Build an MoE layer with each registered router on random data and print a table."""

from __future__ import annotations


def demo() -> None:
    """Placeholder, replaced below."""
