"""Pieces shared by moekit's OpenAI-compatible HTTP servers (the router server `moekit route serve` and the
model server `moekit serve`): client API keys, loopback check, OpenAI-style error and model-list bodies,
and Prometheus-style counters. Framework-free: nothing here imports FastAPI.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
from collections import defaultdict


class RequestError(Exception):
    """A client error, answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(status: int, message: str, kind: str, code: str | int | None = None) -> dict:
    """An OpenAI-style error body: {"error": {"message", "type", "param": null, "code"}} (code: the status by
    default)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status if code is None else code}}


def models_body(model_ids: list[str]) -> dict:
    """The /v1/models answer: {"object": "list", "data": [{"id", "object": "model", "owned_by": "moekit"}]}."""
    return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "moekit"} for m in model_ids]}


def load_client_keys(env_name: str | None) -> list[str]:
    """The clients' bearer keys from environment variable `env_name` (comma-separated); [] when None.

    A named variable that is unset or holds no key is an error: starting open by mistake is worse than not starting.
    """
    if env_name is None:
        return []
    value = os.environ.get(env_name)
    keys = [k.strip() for k in (value or "").split(",") if k.strip()]
    if not keys:
        found = "is not set" if value is None else "holds no key"
        raise ValueError(f"client keys: environment variable {env_name} {found}; expected comma-separated keys")
    return keys


def key_matches(given: str, keys: list[str]) -> bool:
    """True when `given` equals one of `keys`; every key is compared, each in constant time (hmac.compare_digest)."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


def bearer_denied(authorization: str, keys: list[str]) -> str | None:
    """None when the `Authorization` header value carries one of `keys` (or no keys are required), else the
    reason for a 401."""
    if not keys:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "bearer" and given and key_matches(given.strip(), keys):
        return None
    return "wrong API key" if given else "no API key (expected the header Authorization: Bearer <key>)"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _escape(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters exposed at /metrics in Prometheus text format, each name prefixed with `prefix`; thread-safe."""

    def __init__(self, prefix: str = "moekit_") -> None:
        self.prefix = prefix
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge (a value that is read, not accumulated: a hit rate, a queue length)."""
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] = float(value)

    def get(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self.counters.items())
        lines = []
        for (name, labels), v in items:
            lab = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
            lines.append(f"{self.prefix}{name}{{{lab}}} {v!r}" if lab else f"{self.prefix}{name} {v!r}")
        return "\n".join(lines) + "\n"


__all__ = [
    "Metrics", "RequestError", "bearer_denied", "error_body", "is_loopback", "key_matches", "load_client_keys",
    "models_body",
]
