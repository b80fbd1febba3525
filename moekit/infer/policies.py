"""Eviction policies of expert caches: LRU and LFU, in a registry shared by the live cache
(`moekit.infer.cache.ExpertCache`) and the simulator (`moekit.infer.simulate`), so a simulated hit
rate is the hit rate of the very code that serves.

A policy tracks the keys resident in one cache: `insert(key, demand)` when a key enters (`demand`:
loaded because it was asked for, not prefetched), `access(key)` on a hit, `remove(key)` on
eviction, and `victim(protected)` names the key to evict next (never one in `protected`; None when
every resident key is protected).

- LRU evicts the least recently used key (inserted or hit).
- LFU evicts the resident key used least often over the whole history (frequencies survive
  eviction, "perfect LFU"); ties go to the least recently used. A prefetched key enters with the
  frequency it had, without a use.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from moekit.utils.registry import Registry


class CachePolicy(Protocol):
    """What an eviction policy does (see the module docstring)."""

    def insert(self, key: Hashable, demand: bool = True) -> None: ...
    def access(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victim(self, protected: set | frozenset = frozenset()) -> Hashable | None: ...


POLICIES: Registry[Callable[[], CachePolicy]] = Registry("cache policy")


def register_policy(name: str):
    """Decorator: register a cache policy class under `name`."""
    return POLICIES.register(name)


def build_policy(name: str) -> CachePolicy:
    """A fresh policy `name`; an unknown name lists the known ones (ValueError)."""
    return POLICIES.get(name)()


def list_policies() -> list[str]:
    """Names of the registered cache policies."""
    return POLICIES.list()


@register_policy("lru")
class LRU:
    """Least recently used."""

    def __init__(self) -> None:
        self.order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def insert(self, key: Hashable, demand: bool = True) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def access(self, key: Hashable) -> None:
        self.order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self.order.pop(key, None)

    def victim(self, protected: set | frozenset = frozenset()) -> Hashable | None:
        return next((k for k in self.order if k not in protected), None)


@register_policy("lfu")
class LFU:
    """Least frequently used over the whole history; ties: least recently used."""

    def __init__(self) -> None:
        self.freq: Counter[Hashable] = Counter()
        self.last: dict[Hashable, int] = {}  # resident key -> tick of its last insert or use
        self.tick = 0

    def _touch(self, key: Hashable) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def insert(self, key: Hashable, demand: bool = True) -> None:
        if demand:
            self.freq[key] += 1
        self._touch(key)

    def access(self, key: Hashable) -> None:
        self.freq[key] += 1
        self._touch(key)

    def remove(self, key: Hashable) -> None:
        self.last.pop(key, None)

    def victim(self, protected: set | frozenset = frozenset()) -> Hashable | None:
        cands = [k for k in self.last if k not in protected]
        return min(cands, key=lambda k: (self.freq[k], self.last[k])) if cands else None
