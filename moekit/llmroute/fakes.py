"""Fake OpenAI-compatible backends for tests, benchmarks and demos (answer instantly, slowly, fail, or misbehave).

`fake_backend_app` is a FastAPI app; `raw_backend` answers every request with fixed bytes, for the failures
an app cannot produce cleanly (a stream cut off in the middle).
"""

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

from moekit.utils.deps import require


def fake_backend_app(
    name: str,
    *,
    delay_s: float = 0.0,
    fail_status: int | None = None,
    fail_headers: dict[str, str] | None = None,
    reply: str | None = None,
    html_streams: bool = False,
):
    """A FastAPI app whose /v1/chat/completions answers as model `name`.

    `delay_s`: wait this long before answering (to trigger timeouts); `fail_status`: answer every request
    with this HTTP status (and `fail_headers`, e.g. Retry-After); `reply`: the answer text (default
    "hello from <name>"); `html_streams`: answer streamed requests with a 200 HTML page (a proxy's login
    wall). `app.state.calls` counts the requests it received and `app.state.last_body` keeps the last body.
    """
    require("fastapi")
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI()
    app.state.calls = 0
    app.state.last_body = None
    app.state.last_headers = None
    text = reply if reply is not None else f"hello from {name}"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls += 1
        app.state.last_body = body
        app.state.last_headers = dict(request.headers)
        if delay_s:
            await asyncio.sleep(delay_s)
        if fail_status is not None:
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=fail_status, headers=fail_headers)
        created = int(time.time())
        if body.get("stream") and html_streams:
            return HTMLResponse("<html><body>Please sign in</body></html>")
        if body.get("stream"):
            words = text.split(" ")

            async def events():
                for i, w in enumerate(words):
                    delta = {"content": w if i == 0 else " " + w}
                    ev = {
                        "id": "fake",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body["model"],
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(ev)}\n\n".encode()
                usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
                ev = {
                    "id": "fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": usage,
                }
                yield f"data: {json.dumps(ev)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "fake",
            "object": "chat.completion",
            "created": created,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        }

    return app


def sse_cut_off(events: list[dict]) -> bytes:
    """An HTTP/1.1 200 event stream (chunked) holding `events`, which ends without its final chunk: the bytes
    of a backend that died in the middle of a stream (for `raw_backend`)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b""
    for ev in events:
        data = f"data: {json.dumps(ev)}\n\n".encode()
        body += f"{len(data):x}\r\n".encode() + data + b"\r\n"
    return head + body


@contextmanager
def raw_backend(response: bytes, *, host: str = "127.0.0.1"):
    """A server on `host` that reads each HTTP request and answers it with the bytes `response`, then closes
    the connection; yields its base URL (http://127.0.0.1:PORT). For responses no well-behaved app sends."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(64)
    srv.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                rest += chunk
            conn.sendall(response)

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()
