"""An OpenAI-compatible router server: `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.

A request names a model: `router-<name>` routes with that trained router at its configured trade-off,
`router-<name>-<mu>` at trade-off `mu` (RouteLLM's style, e.g. `router-mf-0.116`), and a backend's model
name goes straight to that backend. The chosen backend gets the request with retries on failure
(timeouts, connection errors, 429, 5xx), then its `fallback` backend, and so on. Streams pass through
byte for byte. API keys are read from the environment at request time and never logged.
"""

import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from moekit.llmroute.config import BackendConfig, RoutesConfig
from moekit.llmroute.deps import require
from moekit.llmroute.prices import estimate_tokens

log = logging.getLogger("moekit.llmroute.server")

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RequestError(Exception):
    """A client error, answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class BackendError(Exception):
    """Every backend tried for a request failed."""


@dataclass
class ServedRouter:
    """A trained router ready to serve."""

    name: str
    router: object
    embedder: object
    mu: float


class Metrics:
    """Counters exposed at /metrics in Prometheus text format."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += value

    def get(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines = []
        for (name, labels), v in sorted(self.counters.items()):
            lab = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
            lines.append(f"moekit_route_{name}{{{lab}}} {v!r}" if lab else f"moekit_route_{name} {v!r}")
        return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def query_text(messages: list[dict]) -> str:
    """The text a router sees: the last user message (text parts joined), else the last message."""
    chosen = None
    for m in reversed(messages):
        if m.get("role") == "user":
            chosen = m
            break
    chosen = chosen or messages[-1]
    content = chosen.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def validate_chat_body(body: object, max_messages: int) -> dict:
    """Check an OpenAI chat-completions body; raise `RequestError(400)` naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request body: expected a JSON object, found {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model': expected a non-empty string")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages': expected a non-empty list of {role, content}")
    if len(msgs) > max_messages:
        raise RequestError(400, f"'messages': expected at most {max_messages} messages, found {len(msgs)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"'messages[{i}]': expected an object with a string 'role'")
        c = m.get("content")
        if c is not None and not isinstance(c, str | list):
            raise RequestError(400, f"'messages[{i}].content': expected a string, a list of parts, or null")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, "'stream': expected true or false")
    return body


class RouterService:
    """Routing and forwarding, independent of the web framework (FastAPI wraps it in `create_app`)."""

    def __init__(self, config: RoutesConfig, routers: dict[str, ServedRouter] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.routers = routers if routers is not None else self._load_routers()
        for sr in self.routers.values():
            missing = [m for m in sr.router.models if m not in {b.model for b in config.backends}]
            if missing:
                raise ValueError(f"router {sr.name!r} may choose models with no backend: {missing}")
            if getattr(sr.router, "needs_table", False):
                raise ValueError(f"router {sr.name!r} ({sr.router.name}) needs true labels and cannot serve")
        for b in config.backends:
            if b.api_key_env and b.api_key_env not in os.environ:
                log.warning(
                    "backend %s: environment variable %s is not set; sending no API key", b.model, b.api_key_env
                )
        self.client = None

    def _load_routers(self) -> dict[str, ServedRouter]:
        from moekit.llmroute.pipeline import load_trained

        out = {}
        for entry in self.config.routers:
            t = load_trained(entry.path)
            out[entry.name] = ServedRouter(entry.name, t.router, t.embedder, entry.mu)
        return out

    async def start(self) -> None:
        if self.config.server.blas_threads:
            # Routing multiplies one query by a few thousand rows: one BLAS thread is fastest, and more threads
            # stall for a scheduler slice whenever the other cores are busy (measured: 0.1 ms -> 12 ms spikes).
            from threadpoolctl import threadpool_limits

            threadpool_limits(self.config.server.blas_threads)
        for sr in self.routers.values():  # warm up: lazy parts of embedders and routers are built now, not on a request
            sr.router.route(sr.embedder.encode(["warm up"]), sr.mu)
        httpx = require("httpx")
        n = self.config.server.max_connections
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def model_ids(self) -> list[str]:
        return [f"router-{n}" for n in self.routers] + [b.model for b in self.config.backends]

    def resolve(self, model: str, text: str) -> tuple[str, str]:
        """(chosen backend model, how it was chosen) for a request's `model` field and query text."""
        backends = {b.model for b in self.config.backends}
        if model in backends:
            return model, "direct"
        if model.startswith("router-"):
            rest = model[len("router-") :]
            name, mu = rest, None
            if rest not in self.routers and "-" in rest:
                name, _, mu_s = rest.rpartition("-")
                try:
                    mu = float(mu_s)
                except ValueError:
                    name, mu = rest, None
            if name in self.routers:
                sr = self.routers[name]
                if mu is None:
                    mu = sr.mu
                if not (math.isfinite(mu) and 0.0 <= mu <= 1.0):
                    raise RequestError(400, f"model {model!r}: trade-off must be in [0, 1], found {mu}")
                t0 = time.perf_counter()
                x = sr.embedder.encode([text])
                choice = int(np.asarray(sr.router.route(x, mu))[0])
                self.metrics.inc("routing_seconds_sum", time.perf_counter() - t0, router=name)
                self.metrics.inc("routed_total", router=name, model=sr.router.models[choice])
                return sr.router.models[choice], f"router-{name}@{mu:g}"
        raise RequestError(404, f"model {model!r} not found; available: {self.model_ids()}", "model_not_found")

    def _chain(self, model: str) -> list[BackendConfig]:
        chain, seen = [], set()
        cur: str | None = model
        while cur is not None and cur not in seen:
            seen.add(cur)
            b = self.config.backend(cur)
            chain.append(b)
            cur = b.fallback
        return chain

    def _headers(self, b: BackendConfig) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if b.api_key_env and os.environ.get(b.api_key_env):
            h["authorization"] = f"Bearer {os.environ[b.api_key_env]}"
        return h

    def account(self, model: str, usage: dict | None, prompt_text: str, completion_chars: int) -> None:
        """Add tokens and dollars for one answer (from `usage`, else estimated from text length)."""
        if usage and isinstance(usage.get("prompt_tokens"), int | float):
            pt, ct = float(usage.get("prompt_tokens", 0)), float(usage.get("completion_tokens", 0) or 0)
        else:
            pt, ct = float(estimate_tokens(prompt_text)), float(max(0, math.ceil(completion_chars / 4)))
        self.metrics.inc("prompt_tokens_total", pt, model=model)
        self.metrics.inc("completion_tokens_total", ct, model=model)
        try:
            self.metrics.inc("cost_dollars_total", self.config.price_table.cost(model, pt, ct), model=model)
        except KeyError:
            self.metrics.inc("unpriced_requests_total", model=model)

    async def _attempts(self, body: dict, model: str, *, stream: bool):
        """Try the backends of `model`'s fallback chain; return (backend, httpx response) of the first success."""
        httpx = require("httpx")
        last = "no backend tried"
        for i, b in enumerate(self._chain(model)):
            if i > 0:
                self.metrics.inc("fallbacks_total", to=b.model)
            payload = dict(body, model=b.served_model)
            timeout = httpx.Timeout(b.timeout_s)
            for attempt in range(b.retries + 1):
                if attempt:
                    self.metrics.inc("retries_total", backend=b.model)
                try:
                    req = self.client.build_request(
                        "POST",
                        f"{b.base_url}/chat/completions",
                        json=payload,
                        headers=self._headers(b),
                        timeout=timeout,
                    )
                    resp = await self.client.send(req, stream=stream)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    last = f"{b.model}: {type(exc).__name__}"
                    self.metrics.inc("backend_errors_total", backend=b.model, reason=type(exc).__name__)
                    continue
                if resp.status_code in _RETRY_STATUS:
                    await resp.aclose()
                    last = f"{b.model}: HTTP {resp.status_code}"
                    self.metrics.inc("backend_errors_total", backend=b.model, reason=str(resp.status_code))
                    continue
                return b, resp
        raise BackendError(f"every backend failed; last error: {last}")

    async def complete(self, body: dict) -> tuple[int, bytes, dict[str, str]]:
        """Non-streaming: (status, the backend's JSON body as bytes, extra headers)."""
        text = query_text(body["messages"])
        model, how = self.resolve(body["model"], text)
        b, resp = await self._attempts(body, model, stream=False)
        try:
            raw = resp.content
            data = json.loads(raw)
        except ValueError:
            raise BackendError(f"{b.model}: backend answered with a body that is not JSON") from None
        finally:
            await resp.aclose()
        self.metrics.inc("requests_total", model=b.model, status=str(resp.status_code))
        if resp.status_code < 400 and isinstance(data, dict):
            chars = sum(
                len(str((c.get("message") or {}).get("content") or ""))
                for c in data.get("choices", [])
                if isinstance(c, dict)
            )
            self.account(b.model, data.get("usage"), text, chars)
        return resp.status_code, raw, {"x-moekit-model": b.model, "x-moekit-route": how}

    async def stream(self, body: dict):
        """Streaming: (status, async iterator of raw bytes, extra headers, content type).

        Failures before the first byte fall back to other backends; after it, the stream simply ends.
        """
        text = query_text(body["messages"])
        model, how = self.resolve(body["model"], text)
        b, resp = await self._attempts(body, model, stream=True)
        self.metrics.inc("requests_total", model=b.model, status=str(resp.status_code))

        async def relay():
            usage, chars, buf = None, 0, b""
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        u, n = _parse_sse(line)
                        usage, chars = u or usage, chars + n
            finally:
                await resp.aclose()
                if resp.status_code < 400:
                    self.account(b.model, usage, text, chars)

        headers = {"x-moekit-model": b.model, "x-moekit-route": how}
        return resp.status_code, relay(), headers, resp.headers.get("content-type", "text/event-stream")


def _parse_sse(line: bytes) -> tuple[dict | None, int]:
    """(usage if the event has one, characters of content in it) for one `data: {...}` line."""
    line = line.strip()
    if not line.startswith(b"data:") or line == b"data: [DONE]":
        return None, 0
    try:
        ev = json.loads(line[5:])
    except ValueError:
        return None, 0
    if not isinstance(ev, dict):
        return None, 0
    n = 0
    for c in ev.get("choices") or []:
        if isinstance(c, dict):
            n += len(str((c.get("delta") or {}).get("content") or ""))
    return ev.get("usage") if isinstance(ev.get("usage"), dict) else None, n


def create_app(config: RoutesConfig, routers: dict[str, ServedRouter] | None = None):
    """The FastAPI app serving `config` (routers loaded from their folders unless given)."""
    require("fastapi")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    service = RouterService(config, routers)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="moekit router", lifespan=lifespan)
    app.state.service = service

    def error(status: int, message: str, kind: str) -> JSONResponse:
        service.metrics.inc("client_errors_total", status=str(status))
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "routers": list(service.routers), "backends": [b.model for b in config.backends]}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "moekit"} for m in service.model_ids()],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        limit = config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return error(413, f"request body: expected at most {limit} bytes, found {declared}", "request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                return error(413, f"request body: expected at most {limit} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return error(400, "request body: expected JSON", "invalid_request_error")
        try:
            body = validate_chat_body(body, config.server.max_messages)
            if body.get("stream"):
                status, chunks, headers, media_type = await service.stream(body)
                return StreamingResponse(chunks, status_code=status, headers=headers, media_type=media_type)
            status, raw, headers = await service.complete(body)
            return Response(raw, status_code=status, headers=headers, media_type="application/json")
        except RequestError as exc:
            return error(exc.status, exc.message, exc.kind)
        except BackendError as exc:
            service.metrics.inc("failed_requests_total")
            return error(502, str(exc), "backend_error")

    return app


def run_server(config: RoutesConfig, *, host: str | None = None, port: int | None = None) -> None:
    """Serve `config` with uvicorn until interrupted."""
    uvicorn = require("uvicorn")
    app = create_app(config)
    uvicorn.run(
        app,
        host=host or config.server.host,
        port=port if port is not None else config.server.port,
        log_level="info",
        access_log=False,
    )
