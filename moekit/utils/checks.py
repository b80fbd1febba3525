"""Argument checks shared by constructors and configs, with one wording for their errors."""

from __future__ import annotations

from typing import Any


def is_positive_int(v: Any) -> bool:
    """An int >= 1 (bools are not counts)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_positive_ints(label: str, **values: Any) -> None:
    """Raise ValueError "{label}{name} must be a positive integer, got ..." for the first value that is not.

    `label` ends with its separator: "DuoExperts: " for modules, "LMConfig." for config fields."""
    for name, v in values.items():
        if not is_positive_int(v):
            raise ValueError(f"{label}{name} must be a positive integer, got {v!r}")
