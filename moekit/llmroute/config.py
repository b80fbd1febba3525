"""The router server's configuration (`routes.yaml`) as typed dataclasses, checked on construction.

```yaml
server: {host: 127.0.0.1, port: 6060}
routers:
  - name: knn                      # served as model "router-knn"; "router-knn-0.3" sets mu = 0.3
    path: runs/mmlu-knn            # folder written by `moekit route train`
    mu: 0.5                        # default trade-off (the threshold alpha for threshold / mf)
backends:
  - model: gpt-4-1106-preview      # the model name the router chooses (a column of its table)
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY    # the key is read from this environment variable, never from here
    fallback: mistralai/Mixtral-8x7B-Instruct-v0.1
prices: {gpt-4-1106-preview: {input: 10.0, output: 30.0}}
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from moekit.llmroute.prices import PriceTable

_SECRET_KEYS = ("api_key", "apikey", "key", "token", "secret", "password", "authorization")


def _check_keys(cls, d: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, found {type(d).__name__}")
    secret = [k for k in d if k.lower() in _SECRET_KEYS]
    if secret:
        raise ValueError(
            f"{where}: found {secret} in the config; keys never go in the config file — put the key in an "
            "environment variable and name it with api_key_env"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; expected some of {sorted(known)}")


@dataclass
class ServerSettings:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"  # address to bind; 127.0.0.1 keeps it local
    port: int = 6060  # TCP port
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_messages: int = 512  # more chat messages than this get 400
    max_connections: int = 1000  # most simultaneous connections to the backends
    blas_threads: int = 1  # BLAS threads for the routing math (0 = leave as is); 1 avoids thread hand-off stalls
    max_route_chars: int = 16_000  # a router embeds at most this many characters of a prompt (first and last halves)
    api_keys_env: str | None = None  # environment variable holding the clients' bearer keys, comma-separated

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port: expected 0..65535, found {self.port}")
        if not isinstance(self.blas_threads, int) or self.blas_threads < 0:
            raise ValueError(f"server.blas_threads: expected an integer >= 0, found {self.blas_threads!r}")
        if self.api_keys_env is not None and (not isinstance(self.api_keys_env, str) or not self.api_keys_env):
            raise ValueError(
                f"server.api_keys_env: expected an environment variable's name, found {self.api_keys_env!r}"
            )
        for name in ("max_body_bytes", "max_messages", "max_connections", "max_route_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"server.{name}: expected an integer >= 1, found {v!r}")


@dataclass
class RouterEntry:
    """A trained router the server offers as model `router-<name>`."""

    name: str  # served as "router-<name>"
    path: str  # folder written by `moekit route train`
    mu: float = 0.5  # default trade-off in [0, 1] (0 = best quality, 1 = lowest cost)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_." for c in self.name):
            raise ValueError(f"routers[].name: expected letters, digits, '_' or '.', found {self.name!r}")
        if not (isinstance(self.mu, int | float) and 0.0 <= self.mu <= 1.0):
            raise ValueError(f"routers[{self.name}].mu: expected a number in [0, 1], found {self.mu!r}")


@dataclass
class BackendConfig:
    """An OpenAI-compatible backend (vLLM, Ollama, OpenAI) serving one model."""

    model: str  # the model name routers choose (a column of the routing table)
    base_url: str  # e.g. http://127.0.0.1:8000/v1 ; /chat/completions is appended
    served_model: str | None = None  # model name sent to the backend (None = `model`)
    api_key_env: str | None = None  # environment variable holding the API key (None = no key)
    timeout_s: float = 60.0  # per-attempt timeout in seconds (connect, read, write)
    retries: int = 1  # extra attempts on this backend after a failure (timeouts, 5xx, 429, connection errors)
    fallback: str | None = None  # model of the backend to try when this one fails (None = give up)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"backends[{self.model}].base_url: expected http:// or https://, found {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if not (isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"backends[{self.model}].timeout_s: expected seconds > 0, found {self.timeout_s!r}")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ValueError(f"backends[{self.model}].retries: expected an integer in 0..10, found {self.retries!r}")
        if self.served_model is None:
            self.served_model = self.model


@dataclass
class RoutesConfig:
    """The whole `routes.yaml`."""

    backends: list[BackendConfig]  # one per model the routers may choose
    routers: list[RouterEntry] = field(default_factory=list)  # trained routers offered as router-<name>
    server: ServerSettings = field(default_factory=ServerSettings)  # listening and limits
    prices: dict = field(default_factory=dict)  # {model: {input, output}} $ per M tokens, over the defaults

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("backends: expected at least one backend, found none")
        models = [b.model for b in self.backends]
        dup = sorted({m for m in models if models.count(m) > 1})
        if dup:
            raise ValueError(f"backends: expected one backend per model, found duplicates {dup}")
        for b in self.backends:
            if b.fallback is not None and b.fallback not in models:
                raise ValueError(f"backends[{b.model}].fallback: {b.fallback!r} is not a backend; backends: {models}")
        names = [r.name for r in self.routers]
        if len(set(names)) != len(names):
            raise ValueError(f"routers: expected unique names, found {names}")
        self.price_table = PriceTable.from_dict(self.prices)

    def backend(self, model: str) -> BackendConfig:
        for b in self.backends:
            if b.model == model:
                return b
        raise KeyError(f"no backend for model {model!r}; backends: {[b.model for b in self.backends]}")

    @classmethod
    def from_dict(cls, d: dict, *, base_dir: str | Path | None = None) -> RoutesConfig:
        """Build from a parsed YAML mapping; router paths are relative to `base_dir` when given."""
        _check_keys(cls, d, "routes config")
        if "backends" not in d:
            raise ValueError("routes config: expected a 'backends' list")
        backends = []
        for i, b in enumerate(d["backends"] or []):
            _check_keys(BackendConfig, b, f"backends[{i}]")
            backends.append(BackendConfig(**b))
        routers = []
        for i, r in enumerate(d.get("routers") or []):
            _check_keys(RouterEntry, r, f"routers[{i}]")
            r = dict(r)
            if base_dir is not None and not Path(r.get("path", "")).is_absolute():
                r["path"] = str(Path(base_dir) / r["path"])
            routers.append(RouterEntry(**r))
        server = d.get("server") or {}
        _check_keys(ServerSettings, server, "server")
        return cls(backends=backends, routers=routers, server=ServerSettings(**server), prices=d.get("prices") or {})

    @classmethod
    def from_file(cls, path: str | Path) -> RoutesConfig:
        """Read `routes.yaml`; relative router paths are taken from the file's folder."""
        from moekit.utils.deps import require

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"routes config not found: {path}")
        d = require("yaml").safe_load(path.read_text())
        return cls.from_dict(d or {}, base_dir=path.parent)
