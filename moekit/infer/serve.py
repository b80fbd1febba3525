"""`moekit serve MODEL`: an OpenAI-compatible HTTP server for a moekit run or a Hugging Face MoE checkpoint.

Endpoints: `/v1/completions`, `/v1/chat/completions` (streaming with `"stream": true`: server-sent events, then
`data: [DONE]`), `/v1/models`, `/health`, `/metrics` (Prometheus text: requests by endpoint and status, prompt
and completion tokens, generation seconds, queue length, and the expert cache's hits, misses and hit rate when
the experts are offloaded). Request fields: `serve_wire.parse_request`; per-request routing in the `moekit`
field (`steer`'s disable/force, `dynamic_k`'s top-p).

One worker thread generates, one request at a time (steering and the expert cache are per model, so requests
never interleave); at most `max_queue` more wait, and a request beyond that gets 429 with Retry-After, as the
router server answers a rate limit. A request has `timeout_s` from arrival to its last token: past it while
waiting or before its first token it gets 504; a stream past it ends with an error event. Client keys, error
bodies and counters are the router server's (`moekit.utils.httpserve`); bad input gets 4xx JSON, never 500.
"""

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from moekit.infer.engines import Engine
from moekit.infer.serve_wire import GenRequest, parse_request
from moekit.utils.deps import require
from moekit.utils.httpserve import (
    Metrics,
    RequestError,
    bearer_denied,
    error_body,
    is_loopback,
    load_client_keys,
    models_body,
)

log = logging.getLogger("moekit.infer.serve")


@dataclass
class ServeConfig:
    """How `moekit serve` listens and what it accepts."""

    host: str = "127.0.0.1"  # address to bind; 127.0.0.1 keeps it local
    port: int = 8000  # TCP port
    max_queue: int = 16  # requests that may wait while one generates; more get 429
    timeout_s: float = 300.0  # seconds from a request's arrival to its last token; past it: 504 / stream error
    max_tokens: int = 256  # the most tokens a request may ask for, and the default when it asks for none
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    api_keys_env: str | None = None  # environment variable holding the clients' bearer keys, comma-separated

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, found {self.port}")
        for name in ("max_queue", "max_tokens", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {v!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected a number > 0, found {self.timeout_s!r}")


class QueueFull(Exception):
    """The request queue holds `max_queue` requests already."""


class Job:
    """One unit of work for the worker: `run(job)` on the worker thread; events reach the event loop's queue."""

    def __init__(self, run: "Callable[[Job], None]", loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.run, self.loop, self.deadline = run, loop, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, *event: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def expired(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class Worker:
    """A thread running jobs one at a time from a queue of at most `max_queue` waiting jobs."""

    def __init__(self, max_queue: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="moekit-serve-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if job.expired():
                job.emit("error", 504, "timed out waiting in the request queue", "timeout_error")
                continue
            try:
                job.run(job)
            except Exception as exc:  # a bug of ours: the request gets an error, the worker lives on
                log.exception("internal error while generating")
                job.emit("error", 500, f"internal error while generating ({type(exc).__name__})", "server_error")


class Detokenizer:
    """Turns token ids into text pieces whose concatenation is the decoded text; holds back a piece that ends in
    an incomplete character (U+FFFD) until the next token completes it."""

    def __init__(self, decode: Callable[[list[int]], str], prefix: list[int]) -> None:
        self.decode, self.ids, self.sent = decode, list(prefix), ""

    def piece(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out

    def flush(self) -> str:
        text = self.decode(self.ids)
        out = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += out
        return out


class ServeService:
    """Generation, queueing and accounting for one `Engine`, independent of the web framework."""

    def __init__(self, engine: Engine, config: ServeConfig) -> None:
        self.engine, self.config = engine, config
        self.metrics = Metrics("moekit_serve_")
        self.worker = Worker(config.max_queue)

    def prompt_ids(self, req: GenRequest) -> list[int]:
        ids = self.engine.encode(req.prompt) if req.kind == "completion" else self.engine.chat_ids(req.messages)
        if not ids:
            raise RequestError(400, "the prompt is empty after tokenisation")
        if len(ids) >= self.engine.max_len:
            raise RequestError(
                400, f"the prompt has {len(ids)} tokens; the model's context is {self.engine.max_len} tokens"
            )
        return ids

    def routing_context(self, req: GenRequest) -> ExitStack:
        """Steering and dynamic k for one request (bad layers or experts: RequestError 400)."""
        from moekit.infer.reroute import dynamic_k
        from moekit.infer.steer import steer

        stack = ExitStack()
        try:
            if req.disable or req.force:
                stack.enter_context(steer(self.engine.model, disable=req.disable, force=req.force))
            if req.top_p_experts is not None:
                stack.enter_context(dynamic_k(self.engine.model, req.top_p_experts))
        except ValueError as exc:
            stack.close()
            raise RequestError(400, f"'moekit': {exc}") from None
        return stack

    def generate(self, req: GenRequest, ids: list[int]) -> "Callable[[Job], None]":
        """The job that generates `req` after prompt `ids`, emitting ("start",), ("text", piece)...,
        ("done", finish_reason, completion_tokens), or ("error", status, message, type)."""

        def run(job: Job) -> None:
            try:
                ctx = self.routing_context(req)
            except RequestError as exc:
                job.emit("error", exc.status, exc.message, exc.kind)
                return
            seed = req.seed if req.seed is not None else int(torch.seed() % (1 << 63))
            gen = torch.Generator().manual_seed(seed)
            detok = Detokenizer(self.engine.decode, ids if req.echo else [])
            n, finish, t0 = 0, "length", time.perf_counter()
            with ctx:
                job.emit("start")
                if req.echo and (piece := detok.piece([])):
                    job.emit("text", piece)
                for tok in self.engine.tokens(
                    ids, req.max_tokens, temperature=req.temperature, top_p=req.top_p, generator=gen
                ):
                    if job.expired():
                        if not job.cancelled.is_set():
                            job.emit("error", 504, f"generation exceeded timeout_s={self.config.timeout_s}",
                                     "timeout_error")
                        self.metrics.inc("generation_seconds_sum", time.perf_counter() - t0)
                        return
                    n += 1
                    if tok == self.engine.eos_id:
                        finish = "stop"
                        break
                    if piece := detok.piece([tok]):
                        job.emit("text", piece)
            if piece := detok.flush():
                job.emit("text", piece)
            self.metrics.inc("generation_seconds_sum", time.perf_counter() - t0)
            job.emit("done", finish, n)

        return run

    def cache_metrics(self) -> None:
        off = self.engine.offloader
        self.metrics.set("queue_length", self.worker.queue.qsize())
        if off is None:
            return
        s = off.stats
        for name in ("hits", "misses", "bytes_loaded", "prefetches", "prefetch_hits", "evictions", "peak_bytes"):
            self.metrics.set(f"expert_cache_{name}", float(getattr(s, name)))
        self.metrics.set("expert_cache_hit_rate", float(s.hit_rate))
        self.metrics.set("expert_cache_capacity_bytes", float(off.cache.capacity_bytes))


def _chunk(req: GenRequest, rid: str, created: int, model: str, text: str | None, finish: str | None,
           role: bool = False) -> bytes:
    if req.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        ev = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    else:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ev = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


def _answer(req: GenRequest, rid: str, created: int, model: str, text: str, finish: str, pt: int, ct: int) -> dict:
    usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
                "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage}


def create_app(engine: Engine, config: ServeConfig | None = None, *, api_keys_env: str | None = None):
    """The FastAPI app serving `engine`. With client keys (`api_keys_env`, default `config.api_keys_env`), every
    endpoint but /health needs `Authorization: Bearer <key>`. `app.state.service` is the `ServeService`."""
    require("fastapi")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    config = config or ServeConfig()
    client_keys = load_client_keys(api_keys_env or config.api_keys_env)
    service = ServeService(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()
            if engine.offloader is not None:
                engine.offloader.close()

    app = FastAPI(title="moekit serve", lifespan=lifespan)
    app.state.service = service
    app.state.auth = bool(client_keys)

    def error(status: int, message: str, kind: str, *, code=None, headers=None, endpoint: str = "") -> JSONResponse:
        service.metrics.inc("requests_total", endpoint=endpoint, status=str(status))
        return JSONResponse(error_body(status, message, kind, code), status_code=status, headers=headers)

    def denied(request: Request, endpoint: str = "") -> JSONResponse | None:
        what = bearer_denied(request.headers.get("authorization", ""), client_keys)
        if what is None:
            return None
        return error(401, what, "invalid_request_error", code="invalid_api_key",
                     headers={"www-authenticate": "Bearer"}, endpoint=endpoint)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "queued": service.worker.queue.qsize()}

    @app.get("/v1/models")
    async def models(request: Request):
        if (deny := denied(request)) is not None:
            return deny
        return models_body([engine.name])

    @app.get("/metrics")
    async def metrics(request: Request):
        if (deny := denied(request)) is not None:
            return deny
        service.cache_metrics()
        return PlainTextResponse(service.metrics.render())

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(413, f"request body: expected at most {limit} bytes, found {declared}",
                               "request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise RequestError(413, f"request body: expected at most {limit} bytes", "request_too_large")
        return bytes(raw)

    async def handle(request: Request, kind: str, endpoint: str):
        arrival = time.monotonic()
        if (deny := denied(request, endpoint)) is not None:
            return deny
        try:
            req = parse_request(await read_body(request), kind, max_tokens=config.max_tokens)
            if req.model != engine.name:
                raise RequestError(404, f"model {req.model!r} not found; available: [{engine.name!r}]",
                                   "model_not_found")
            ids = service.prompt_ids(req)
        except RequestError as exc:
            return error(exc.status, exc.message, exc.kind, endpoint=endpoint)
        job = Job(service.generate(req, ids), asyncio.get_running_loop(), arrival + config.timeout_s)
        try:
            service.worker.submit(job)
        except QueueFull:
            return error(429, f"the request queue is full ({config.max_queue} waiting); retry later",
                         "rate_limit_error", code="rate_limit_exceeded", headers={"retry-after": "1"},
                         endpoint=endpoint)

        async def next_event():
            left = job.deadline - time.monotonic()
            try:
                return await asyncio.wait_for(job.events.get(), timeout=max(left, 0.0) + 0.5)
            except TimeoutError:
                job.cancelled.set()
                return ("error", 504, f"request exceeded timeout_s={config.timeout_s}", "timeout_error")

        first = await next_event()
        if first[0] == "error":
            _, status, message, etype = first
            return error(status, message, etype, endpoint=endpoint)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        service.metrics.inc("prompt_tokens_total", float(len(ids)))

        def finished(status: int, ct: int) -> None:
            service.metrics.inc("requests_total", endpoint=endpoint, status=str(status))
            service.metrics.inc("completion_tokens_total", float(ct))

        if not req.stream:
            parts = []
            while True:
                ev = await next_event()
                if ev[0] == "text":
                    parts.append(ev[1])
                elif ev[0] == "done":
                    finished(200, ev[2])
                    return _answer(req, rid, created, engine.name, "".join(parts), ev[1], len(ids), ev[2])
                else:
                    job.cancelled.set()
                    return error(ev[1], ev[2], ev[3], endpoint=endpoint)

        async def events():
            ok = False
            try:
                if kind == "chat":
                    yield _chunk(req, rid, created, engine.name, None, None, role=True)
                while True:
                    ev = await next_event()
                    if ev[0] == "text":
                        yield _chunk(req, rid, created, engine.name, ev[1], None)
                    elif ev[0] == "done":
                        yield _chunk(req, rid, created, engine.name, None, ev[1])
                        yield b"data: [DONE]\n\n"
                        finished(200, ev[2])
                        ok = True
                        return
                    else:
                        yield b"data: " + json.dumps(error_body(ev[1], ev[2], ev[3])).encode() + b"\n\n"
                        service.metrics.inc("requests_total", endpoint=endpoint, status=str(ev[1]))
                        ok = True
                        return
            finally:
                if not ok:  # the client went away: stop generating
                    job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion", "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat", "chat_completions")

    return app


def run_server(engine: Engine, config: ServeConfig) -> None:
    """Serve `engine` with uvicorn until interrupted; warns when a non-loopback address is served without keys."""
    uvicorn = require("uvicorn")
    app = create_app(engine, config)
    if not app.state.auth and not is_loopback(config.host):
        log.warning("serving on %s without client keys: anyone who reaches it can use the model; "
                    "set --api-keys-env NAME (an environment variable holding comma-separated keys)", config.host)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)


__all__ = ["Detokenizer", "Job", "QueueFull", "ServeConfig", "ServeService", "Worker", "create_app", "run_server"]
