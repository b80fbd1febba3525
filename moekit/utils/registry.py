"""A registry: a name -> class (or function) map with one way in (CONVENTIONS 11).

moekit keeps four: routers (`moekit.routing.registry`), dispatch backends (`moekit.layers.dispatch`),
experts variants (`moekit.layers.variants`) and LLM query routers (`moekit.llmroute.routers.registry`).
Each is a `Registry` with the same rules:

- `register(name)` is the only way in (a decorator); a name already taken by another object is an error;
- `get(name)` returns what was registered; an unknown name raises `UnknownNameError` listing the known ones;
- `list()` gives the names, sorted; `name in registry` and iteration (sorted) work as on a dict's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. A `KeyError` (a lookup that failed) and a `ValueError` (a bad argument),
    so callers that caught either before the registries were unified still catch it."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names -> objects of one kind ("router", "dispatch backend", ...), named in error messages.

    >>> reg = Registry("widget")
    >>> @reg.register("round")
    ... def round_widget(): ...
    >>> reg.get("round") is round_widget, reg.list()
    (True, ['round'])
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind  # singular noun for messages: "unknown {kind} 'x'; known {kind}s: a, b"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the object under `name` and return it unchanged.

        Registering the same object again under its name is a no-op; another object under a taken name raises
        ValueError naming both."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not obj:
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered to {_label(old)}; cannot register {_label(obj)}"
                )
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered under `name`; an unknown name raises `UnknownNameError` listing the known ones."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.list())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"

    def list(self) -> list[str]:  # noqa: A003  (defined last: `list` in the annotations above is the builtin)
        """Registered names, sorted."""
        return sorted(self._items)


def _label(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__
