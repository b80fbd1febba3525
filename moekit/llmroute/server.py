"""An OpenAI-compatible router server: `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.

A request names a model: `router-<name>` routes with that trained router at its configured trade-off,
`router-<name>-<mu>` at trade-off `mu` (RouteLLM's style, e.g. `router-mf-0.116`), and a backend's model
name goes straight to that backend. The chosen backend gets the request with retries on failure
(timeouts, connection errors, 429, 5xx), then its `fallback` backend, and so on. Streams pass through
byte for byte; a backend that breaks off a stream ends it with an OpenAI-style error event. Backend API
keys are read from the environment at request time and never logged; client keys (`server.api_keys_env`)
are read once at start and compared in constant time. Client input never gets a 500: bad bodies get 400
with an OpenAI-style error. Routing (embedding + scoring) of a long prompt and parsing of a large body run in
a worker thread, and a router embeds at most `server.max_route_chars` characters of a prompt, so a large
prompt never stalls the event loop. The OpenAI wire format (request checks, error bodies, stream events) is
in `moekit.llmroute.wire`.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from moekit.llmroute.config import BackendConfig, RoutesConfig
from moekit.llmroute.prices import estimate_tokens
from moekit.llmroute.wire import (
    RequestError,
    completion_chars,
    error_body,
    models_body,
    parse_body,
    parse_sse_line,
    query_text,
    route_text,
    stream_error_event,
)
from moekit.utils.deps import require
from moekit.utils.httpserve import Metrics, bearer_denied, is_loopback, key_matches, load_client_keys  # noqa: F401

log = logging.getLogger("moekit.llmroute.server")

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
INLINE_CHARS = 4_000  # texts up to this long are routed on the event loop (about 1 ms), longer ones in a thread
INLINE_BYTES = 65_536  # request bodies up to this size are parsed on the event loop, larger ones in a thread


class BackendError(Exception):
    """Every backend tried for a request failed; `retry_after` is the last 429's Retry-After header, if any."""

    def __init__(self, message: str, *, rate_limited: bool = False, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.rate_limited, self.retry_after = rate_limited, retry_after


@dataclass
class ServedRouter:
    """A trained router ready to serve."""

    name: str
    router: object
    embedder: object
    mu: float


class RouterService:
    """Routing and forwarding, independent of the web framework (FastAPI wraps it in `create_app`)."""

    def __init__(self, config: RoutesConfig, routers: dict[str, ServedRouter] | None = None) -> None:
        self.config = config
        self.metrics = Metrics("moekit_route_")
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

    def parse_model(self, model: str) -> tuple[str, str | None, float | None]:
        """("backend" | "router", backend model or router name, trade-off or None) for a request's `model`.

        `router-<name>` and `router-<name>-<mu>` with `mu` any float literal (`0.1`, `1e-3`); the longest
        router name that matches wins, so a name is never cut at a '-' inside the number.
        """
        if model in {b.model for b in self.config.backends}:
            return "backend", model, None
        if model.startswith("router-"):
            rest = model[len("router-") :]
            if rest in self.routers:
                return "router", rest, None
            for name in sorted(self.routers, key=len, reverse=True):
                if rest.startswith(name + "-"):
                    mu_s = rest[len(name) + 1 :]
                    try:
                        mu = float(mu_s)
                    except ValueError:
                        raise RequestError(
                            400, f"model {model!r}: expected router-{name}-<trade-off in [0, 1]>, found {mu_s!r}"
                        ) from None
                    if not (math.isfinite(mu) and 0.0 <= mu <= 1.0):
                        raise RequestError(400, f"model {model!r}: trade-off must be in [0, 1], found {mu_s}")
                    return "router", name, mu
        raise RequestError(404, f"model {model!r} not found; available: {self.model_ids()}", "model_not_found")

    def resolve(self, model: str, text: str) -> tuple[str, str]:
        """(chosen backend model, how it was chosen) for a request's `model` field and query text.

        Routing embeds at most `server.max_route_chars` characters of the text (see `route_text`); it is
        CPU work, so the server calls this in a worker thread.
        """
        kind, target, mu = self.parse_model(model)
        if kind == "backend":
            return target, "direct"
        sr = self.routers[target]
        mu = sr.mu if mu is None else mu
        t0 = time.perf_counter()
        x = sr.embedder.encode([route_text(text, self.config.server.max_route_chars)])
        choice = int(np.asarray(sr.router.route(x, mu))[0])
        self.metrics.inc("routing_seconds_sum", time.perf_counter() - t0, router=target)
        self.metrics.inc("routed_total", router=target, model=sr.router.models[choice])
        return sr.router.models[choice], f"router-{target}@{mu:g}"

    async def resolve_async(self, model: str, text: str) -> tuple[str, str]:
        """`resolve` in a worker thread (the event loop keeps serving other requests meanwhile), or right here
        for a short text (under `INLINE_CHARS`: about a millisecond, less than the hand-off to a thread costs
        when other threads hold the GIL)."""
        if len(text) <= INLINE_CHARS:
            return self.resolve(model, text)
        from anyio import to_thread

        return await to_thread.run_sync(self.resolve, model, text)

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
        last, retry_after = "no backend tried", None
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
                    retry_after = resp.headers.get("retry-after") if resp.status_code == 429 else None
                    self.metrics.inc("backend_errors_total", backend=b.model, reason=str(resp.status_code))
                    continue
                kind = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if stream and resp.status_code < 400 and kind and kind != "text/event-stream":
                    await resp.aclose()  # e.g. an HTML page from a proxy or a login wall: not a stream
                    last, retry_after = f"{b.model}: answered a stream with {kind}, not text/event-stream", None
                    self.metrics.inc("backend_errors_total", backend=b.model, reason="not_sse")
                    continue
                return b, resp
        raise BackendError(
            f"every backend failed; last error: {last}", rate_limited=last.endswith("HTTP 429"), retry_after=retry_after
        )

    async def complete(self, body: dict) -> tuple[int, bytes, dict[str, str]]:
        """Non-streaming: (status, the backend's JSON body as bytes, extra headers)."""
        text = query_text(body["messages"])
        model, how = await self.resolve_async(body["model"], text)
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
            self.account(b.model, data.get("usage"), text, completion_chars(data))
        return resp.status_code, raw, {"x-moekit-model": b.model, "x-moekit-route": how}

    async def stream(self, body: dict):
        """Streaming: (status, async iterator of raw bytes, extra headers, content type).

        Failures before the first byte fall back to other backends. A backend that breaks off the stream
        after it (connection lost, read timeout) ends it with `data: {"error": {...}}`; the request then
        counts as failed in /metrics.
        """
        httpx = require("httpx")
        text = query_text(body["messages"])
        model, how = await self.resolve_async(body["model"], text)
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
                        u, n = parse_sse_line(line)
                        usage, chars = u or usage, chars + n
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                reason = type(exc).__name__
                log.warning("backend %s broke off a stream: %s", b.model, reason)
                self.metrics.inc("backend_errors_total", backend=b.model, reason=f"stream_{reason}")
                self.metrics.inc("failed_requests_total")
                message = f"{b.model}: the backend broke off the stream ({reason})"
                yield stream_error_event(message, after_partial_line=bool(buf))
            finally:
                await resp.aclose()
                if resp.status_code < 400:
                    self.account(b.model, usage, text, chars)

        headers = {"x-moekit-model": b.model, "x-moekit-route": how}
        return resp.status_code, relay(), headers, resp.headers.get("content-type", "text/event-stream")


def create_app(
    config: RoutesConfig, routers: dict[str, ServedRouter] | None = None, *, api_keys_env: str | None = None
):
    """The FastAPI app serving `config` (routers loaded from their folders unless given).

    `api_keys_env` (default `config.server.api_keys_env`) names the environment variable holding the clients'
    keys; with keys, /v1/chat/completions, /v1/models and /metrics need `Authorization: Bearer <key>`.
    """
    require("fastapi")
    from contextlib import asynccontextmanager

    from anyio import to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    client_keys = load_client_keys(api_keys_env or config.server.api_keys_env)
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
    app.state.auth = bool(client_keys)

    def error(
        status: int, message: str, kind: str, *, code: str | int | None = None, headers: dict | None = None
    ) -> JSONResponse:
        service.metrics.inc("client_errors_total", status=str(status))
        return JSONResponse(error_body(status, message, kind, code), status_code=status, headers=headers)

    def denied(request: Request) -> JSONResponse | None:
        """A 401 unless the request carries one of the client keys (None when keys are not required)."""
        what = bearer_denied(request.headers.get("authorization", ""), client_keys)
        if what is None:
            return None
        return error(
            401, what, "invalid_request_error", code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "routers": list(service.routers), "backends": [b.model for b in config.backends]}

    @app.get("/v1/models")
    async def models(request: Request):
        if (deny := denied(request)) is not None:
            return deny
        return models_body(service.model_ids())

    @app.get("/metrics")
    async def metrics(request: Request):
        if (deny := denied(request)) is not None:
            return deny
        return PlainTextResponse(service.metrics.render())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (deny := denied(request)) is not None:
            return deny
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
            if len(raw) <= INLINE_BYTES:  # microseconds: not worth a hand-off to a thread
                body = parse_body(bytes(raw), config.server.max_messages)
            else:
                body = await to_thread.run_sync(parse_body, bytes(raw), config.server.max_messages)
            if body.get("stream"):
                status, chunks, headers, media_type = await service.stream(body)
                return StreamingResponse(chunks, status_code=status, headers=headers, media_type=media_type)
            status, raw, headers = await service.complete(body)
            return Response(raw, status_code=status, headers=headers, media_type="application/json")
        except RequestError as exc:
            return error(exc.status, exc.message, exc.kind)
        except BackendError as exc:
            service.metrics.inc("failed_requests_total")
            if exc.rate_limited:  # the backends are rate limiting: tell the client when to come back
                headers = {"retry-after": exc.retry_after} if exc.retry_after else None
                return error(429, str(exc), "rate_limit_error", code="rate_limit_exceeded", headers=headers)
            return error(502, str(exc), "backend_error")
        except Exception:  # a bug of ours, never the client's input: an OpenAI-style 500, the connection stays up
            log.exception("internal error while serving a chat completion")
            service.metrics.inc("failed_requests_total")
            return error(500, "internal error in the router server (see its log)", "server_error")

    return app


def run_server(
    config: RoutesConfig, *, host: str | None = None, port: int | None = None, api_keys_env: str | None = None
) -> None:
    """Serve `config` with uvicorn until interrupted; warns when a non-loopback address is served without keys."""
    uvicorn = require("uvicorn")
    app = create_app(config, api_keys_env=api_keys_env)
    host = host or config.server.host
    if not app.state.auth and not is_loopback(host):
        log.warning(
            "serving on %s without client keys: anyone who reaches this address can spend your backends' credits; "
            "set --api-keys-env NAME (an environment variable holding comma-separated keys)",
            host,
        )
    uvicorn.run(
        app,
        host=host,
        port=port if port is not None else config.server.port,
        log_level="info",
        access_log=False,
    )
