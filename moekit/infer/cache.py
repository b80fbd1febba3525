"""A fixed-size expert cache measured in bytes, filled on demand and by a prefetcher thread.

Keys are (layer, expert). `acquire(key)` returns the expert's tensors, loading them on a miss
(evicting by the policy, `moekit.infer.policies`) and pinning them until `release(key)`: a pinned
expert is never evicted, so the tensors a computation holds are always counted in the budget.
`prefetch(key)` (called from a background thread) loads a key ahead of use when room can be made
without waiting; a demand `acquire` of a key being prefetched waits for that load instead of
loading it twice. Bytes are reserved before a load starts, so the cached bytes (resident plus
loading) never exceed `capacity_bytes`; `stats.peak_bytes` records the most ever held.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor

from moekit.infer.policies import build_policy

Key = tuple[int, int]  # (layer, expert)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(spec: str | int | float, total_bytes: int) -> int:
    """A memory budget in bytes from "200MB", "1.5GiB", "4096" (bytes), "50%" or a fraction in (0, 1]
    of `total_bytes` (all experts' bytes). Raises ValueError naming `expert_memory` on anything else."""
    if isinstance(spec, bool):
        raise ValueError(f"expert_memory must be bytes, a size like '200MB', or a fraction; got {spec!r}")
    if isinstance(spec, float) or (isinstance(spec, str) and re.fullmatch(r"\s*0?\.\d+\s*|\s*1\.0*\s*", spec)):
        frac = float(spec)
        if not 0 < frac <= 1:
            raise ValueError(f"expert_memory as a fraction must be in (0, 1], got {spec!r}")
        return int(frac * total_bytes)
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"expert_memory must be > 0 bytes, got {spec}")
        return spec
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[KMG]I?B|B)?\s*", str(spec).upper())
    if not m:
        raise ValueError(
            f"expert_memory must look like '200MB', '1.5GiB', '4096', '50%' or '0.5', got {spec!r}"
        )
    value, unit = float(m.group(1)), m.group(2) or ""
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"expert_memory as a percentage must be in (0, 100], got {spec!r}")
        return int(value / 100 * total_bytes)
    if unit in ("", "B") and not value.is_integer():
        raise ValueError(f"expert_memory in bytes must be a whole number (a fraction must be <= 1), got {spec!r}")
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"expert_memory must be > 0 bytes, got {spec!r}")
    return n


@dataclass
class CacheStats:
    """Counters of an expert cache (demand requests only count as hits or misses)."""

    hits: int = 0  # demand requests served from the cache (or from a prefetch already loading)
    misses: int = 0  # demand requests that loaded the expert
    bytes_loaded: int = 0  # bytes read from the checkpoint, demand and prefetch
    prefetches: int = 0  # experts loaded by the prefetcher
    prefetch_hits: int = 0  # hits on a prefetched expert before any other use of it
    evictions: int = 0
    peak_bytes: int = 0  # most bytes ever held (resident + loading); never above the capacity

    @property
    def hit_rate(self) -> float:
        """hits / requests (0 before any request)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "hit_rate": self.hit_rate}


@dataclass
class _State:
    entries: dict[Hashable, tuple[Tensor, ...]] = field(default_factory=dict)
    sizes: dict[Hashable, int] = field(default_factory=dict)
    loading: set = field(default_factory=set)
    fresh: set = field(default_factory=set)  # prefetched, not used yet
    pins: Counter = field(default_factory=Counter)
    used: int = 0  # bytes resident + reserved for loads in flight


class ExpertCache:
    """Experts' tensors under a byte budget.

    Args:
        capacity_bytes: the budget.
        policy: eviction policy name ("lru", "lfu").
        loader: key -> the expert's tensors (read from disk; called without the lock held).
        entry_bytes: key -> bytes the tensors of that key take (known before loading).
    """

    def __init__(
        self,
        *,
        capacity_bytes: int,
        policy: str,
        loader: Callable[[Key], tuple[Tensor, ...]],
        entry_bytes: Callable[[Key], int],
    ) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"ExpertCache: capacity_bytes must be a positive integer, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.policy = build_policy(policy)
        self.policy_name = policy
        self.loader = loader
        self.entry_bytes = entry_bytes
        self.stats = CacheStats()
        self._s = _State()
        self._cv = threading.Condition()

    @property
    def cached_bytes(self) -> int:
        """Bytes held now (resident + loading)."""
        return self._s.used

    def __contains__(self, key: Key) -> bool:
        return key in self._s.entries

    def _make_room(self, n: int, *, wait: bool) -> bool:
        """Evict until n more bytes fit, then reserve them (lock held). False when impossible without
        waiting (wait=False), or raise when nothing can ever be evicted (wait=True)."""
        s = self._s
        if n > self.capacity_bytes:
            raise RuntimeError(f"an expert of {n} bytes does not fit in a cache of {self.capacity_bytes} bytes")
        while s.used + n > self.capacity_bytes:
            key = self.policy.victim(protected=set(+s.pins))
            if key is None:
                if not wait:
                    return False
                if not s.loading:
                    raise RuntimeError(
                        f"expert cache of {self.capacity_bytes} bytes is full of experts in use; raise expert_memory"
                    )
                self._cv.wait()
                continue
            self.policy.remove(key)
            del s.entries[key]
            s.fresh.discard(key)
            s.used -= s.sizes.pop(key)
            self.stats.evictions += 1
        s.used += n
        self.stats.peak_bytes = max(self.stats.peak_bytes, s.used)
        return True

    def _load(self, key: Key, n: int) -> tuple[Tensor, ...]:
        try:
            return self.loader(key)
        except BaseException:
            with self._cv:
                self._s.loading.discard(key)
                self._s.used -= n
                self._cv.notify_all()
            raise

    def acquire(self, key: Key) -> tuple[Tensor, ...]:
        """The tensors of `key`, pinned until `release(key)`; a miss loads them (evicting by the policy)."""
        s = self._s
        with self._cv:
            while key in s.loading:  # the prefetcher is loading it: wait rather than read it twice
                self._cv.wait()
            if key in s.entries:
                self.stats.hits += 1
                if key in s.fresh:
                    self.stats.prefetch_hits += 1
                    s.fresh.discard(key)
                self.policy.access(key)
                s.pins[key] += 1
                return s.entries[key]
            self.stats.misses += 1
            n = self.entry_bytes(key)
            self._make_room(n, wait=True)
            s.loading.add(key)
            s.pins[key] += 1  # nothing may evict it between the load and its use
        tensors = self._load(key, n)
        with self._cv:
            s.entries[key], s.sizes[key] = tensors, n
            s.loading.discard(key)
            self.policy.insert(key, demand=True)
            self.stats.bytes_loaded += n
            self._cv.notify_all()
        return tensors

    def release(self, key: Key) -> None:
        """Unpin `key` (once per `acquire`)."""
        with self._cv:
            self._s.pins[key] -= 1
            if self._s.pins[key] <= 0:
                del self._s.pins[key]
            self._cv.notify_all()

    @contextmanager
    def use(self, key: Key) -> Iterator[tuple[Tensor, ...]]:
        """`with cache.use(key) as tensors:` acquire, then release on exit."""
        tensors = self.acquire(key)
        try:
            yield tensors
        finally:
            self.release(key)

    def prefetch(self, key: Key) -> bool:
        """Load `key` ahead of use if it is not cached and room can be made without waiting (True when it
        was loaded). Meant for a background thread."""
        s = self._s
        with self._cv:
            if key in s.entries or key in s.loading:
                return False
            n = self.entry_bytes(key)
            if not self._make_room(n, wait=False):
                return False
            s.loading.add(key)
        tensors = self._load(key, n)
        with self._cv:
            s.entries[key], s.sizes[key] = tensors, n
            s.loading.discard(key)
            s.fresh.add(key)
            self.policy.insert(key, demand=False)
            self.stats.bytes_loaded += n
            self.stats.prefetches += 1
            self._cv.notify_all()
        return True
