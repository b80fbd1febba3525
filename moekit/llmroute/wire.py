"""The OpenAI chat-completions wire format the router server speaks: request bodies in, error bodies and
stream events out, and what the server reads from answers (usage, characters of content).

Everything here is pure data shaping (JSON in, dicts and bytes out), independent of the web framework and of
routing, so it is tested on its own and `server.py` keeps to routing, forwarding and accounting.
"""

from __future__ import annotations

import json
import math
import re

from moekit.utils.httpserve import RequestError, error_body, models_body  # noqa: F401  (re-exported)


def stream_error_event(message: str, *, after_partial_line: bool = False) -> bytes:
    """The server-sent event that ends a broken-off stream: `data: {"error": {...}}` (type backend_error, code
    502), after a blank line when the stream stopped in the middle of an event."""
    event = json.dumps(error_body(502, message, "backend_error")).encode()
    return (b"\n\n" if after_partial_line else b"") + b"data: " + event + b"\n\n"


def completion_chars(answer: object) -> int:
    """Characters of content in a non-streaming answer's choices (0 for anything that is not an answer)."""
    if not isinstance(answer, dict):
        return 0
    return sum(
        len(str((c.get("message") or {}).get("content") or ""))
        for c in answer.get("choices", [])
        if isinstance(c, dict)
    )


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
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(t for t in parts if isinstance(t, str))
    return ""


def route_text(text: str, max_chars: int) -> str:
    """What a router embeds: `text`, or (when longer than `max_chars`) its first `max_chars // 2` characters,
    a newline and its last characters, `max_chars` in all."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max(0, max_chars - head - 1)
    return text[:head] + "\n" + (text[len(text) - tail :] if tail else "")


def _reject_constant(name: str):
    raise ValueError(f"request body: {name} is not JSON; expected finite numbers")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"request body: the number {text[:40]} is out of range; expected finite numbers")
    return v


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")  # \ud800-\udfff: a surrogate, maybe unpaired


def parse_body(raw: bytes, max_messages: int) -> dict:
    """Parse and check a chat-completions request body; raise `RequestError(400)` naming what is wrong.

    Rejects what json.loads accepts but JSON does not (NaN, Infinity, numbers too large for a float) and
    strings that are not valid Unicode (lone surrogates such as "\\ud800"), since none can be forwarded.
    One parse; the body is encoded again only when it holds a surrogate escape (to tell pairs from lone ones).
    """
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(400, "request body: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise RequestError(400, "request body: expected UTF-8 encoded JSON") from None
    except ValueError as exc:
        msg = str(exc)
        raise RequestError(
            400, msg if msg.startswith("request body:") else f"request body: expected JSON ({msg})"
        ) from None
    body = validate_chat_body(body, max_messages)
    if _SURROGATE_ESCAPE.search(raw):
        try:  # what the backends will be sent must encode: no lone surrogates
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "request body: a string holds a lone surrogate (e.g. \\ud800)") from None
    return body


def _json_type(v: object) -> str:
    """The JSON name of a parsed value's type (for error messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(type(v), "?")


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
        for j, part in enumerate(c if isinstance(c, list) else []):
            where = f"'messages[{i}].content[{j}]'"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(400, f"{where}: expected an object with a string 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                found = _json_type(part["text"]) if "text" in part else "nothing"
                raise RequestError(400, f"{where}.text: expected a string, found {found}")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, "'stream': expected true or false")
    return body


def parse_sse_line(line: bytes) -> tuple[dict | None, int]:
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
