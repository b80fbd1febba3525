"""A fake OpenAI-compatible backend for tests, benchmarks and demos (answers instantly, or slowly, or fails)."""

import asyncio
import json
import time

from moekit.llmroute.deps import require


def fake_backend_app(name: str, *, delay_s: float = 0.0, fail_status: int | None = None, reply: str | None = None):
    """A FastAPI app whose /v1/chat/completions answers as model `name`.

    `delay_s`: wait this long before answering (to trigger timeouts); `fail_status`: answer every request
    with this HTTP status; `reply`: the answer text (default "hello from <name>"). `app.state.calls`
    counts the requests it received and `app.state.last_body` keeps the last body.
    """
    require("fastapi")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

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
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=fail_status)
        created = int(time.time())
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
