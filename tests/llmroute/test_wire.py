"""The OpenAI wire format of the router server (moekit.llmroute.wire), on its own: no app, no backends."""

from __future__ import annotations

import json

import pytest

from moekit.llmroute.wire import (
    RequestError,
    completion_chars,
    error_body,
    models_body,
    parse_body,
    parse_sse_line,
    stream_error_event,
)


def test_error_body_and_stream_error_event():
    assert error_body(400, "bad", "invalid_request_error") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}
    }
    keyed = error_body(401, "no key", "invalid_request_error", code="invalid_api_key")
    assert keyed["error"]["code"] == "invalid_api_key"
    event = stream_error_event("m: broke off")
    want = {"error": {"message": "m: broke off", "type": "backend_error", "param": None, "code": 502}}
    assert event == b"data: " + json.dumps(want).encode() + b"\n\n"
    assert stream_error_event("x", after_partial_line=True).startswith(b"\n\ndata: {")


def test_models_body_and_completion_chars():
    assert models_body(["router-a", "gpt"]) == {
        "object": "list",
        "data": [{"id": "router-a", "object": "model", "owned_by": "moekit"},
                 {"id": "gpt", "object": "model", "owned_by": "moekit"}],
    }
    answer = {"choices": [{"message": {"content": "four"}}, {"message": {"content": None}}, "junk", {"message": {}}]}
    assert completion_chars(answer) == 4 and completion_chars([1]) == 0 and completion_chars({}) == 0


def test_parse_sse_line_reads_usage_and_content():
    ev = {"choices": [{"delta": {"content": "abc"}}, {"delta": {}}], "usage": {"prompt_tokens": 3}}
    assert parse_sse_line(b"data: " + json.dumps(ev).encode() + b"\r") == ({"prompt_tokens": 3}, 3)
    for line in (b"data: [DONE]", b": keep-alive", b"data: {not json", b"data: [1, 2]"):
        assert parse_sse_line(line) == (None, 0)


def test_parse_body_rejects_what_cannot_be_forwarded():
    ok = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', max_messages=4)
    assert ok["model"] == "m"
    for raw, msg in [
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "t": NaN}', "not JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
        (b'{"model": "", "messages": []}', "'model': expected a non-empty string"),
        (b'[1]', "expected a JSON object, found list"),
    ]:
        with pytest.raises(RequestError, match=msg) as info:
            parse_body(raw, max_messages=4)
        assert info.value.status == 400
