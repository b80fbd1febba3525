"""Strict construction of config dataclasses from plain dicts (config.json)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict_strict(cls: type[T], d: dict[str, Any]) -> T:
    """cls(**d), but an unknown key is an error naming it and listing the valid fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; valid fields: {sorted(names)}")
    return cls(**d)
