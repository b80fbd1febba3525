"""The router server end to end, with fake OpenAI-compatible backends on 127.0.0.1 (bounded in time)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from moekit.llmroute.config import RoutesConfig
from moekit.llmroute.fakes import fake_backend_app
from moekit.llmroute.localserve import serve_in_thread
from moekit.llmroute.routers import create
from moekit.llmroute.server import ServedRouter, create_app

MATH = "solve the integral and the derivative of this polynomial equation"
CHAT = "tell me a joke about the weather this weekend"


@pytest.fixture(scope="module")
def backends():
    apps = {
        "weak": fake_backend_app("weak"),
        "strong": fake_backend_app("strong"),
        "slow": fake_backend_app("slow", delay_s=3.0),
        "broken": fake_backend_app("broken", fail_status=503),
    }
    with (
        serve_in_thread(apps["weak"]) as w,
        serve_in_thread(apps["strong"]) as s,
        serve_in_thread(apps["slow"]) as sl,
        serve_in_thread(apps["broken"]) as b,
    ):
        yield {
            "weak": (w, apps["weak"]),
            "strong": (s, apps["strong"]),
            "slow": (sl, apps["slow"]),
            "broken": (b, apps["broken"]),
        }


@pytest.fixture(scope="module")
def knn(synthetic):
    train, _, emb, x_train, _ = synthetic
    return ServedRouter("knn", create("knn", k=5).fit(train, x_train), emb, 0.1)


def start(backends, knn, strong_url_key="strong", **strong_opts):
    cfg = RoutesConfig.from_dict(
        {
            "backends": [
                {"model": "weak", "base_url": backends["weak"][0] + "/v1", "served_model": "weak-7b"},
                {"model": "strong", "base_url": backends[strong_url_key][0] + "/v1", "fallback": "weak", **strong_opts},
            ],
            "prices": {"weak": {"input": 1.0, "output": 1.0}, "strong": {"input": 10.0, "output": 30.0}},
            "server": {"max_body_bytes": 20_000},
        }
    )
    return serve_in_thread(create_app(cfg, {"knn": knn}))


def chat(client, url, text, model="router-knn", **extra):
    return client.post(
        f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}], **extra}
    )


def test_routes_each_query_and_accounts_cost(backends, knn):
    with start(backends, knn) as url, httpx.Client(timeout=10) as c:
        r = chat(c, url, MATH)
        assert r.status_code == 200 and r.headers["x-moekit-model"] == "strong"
        assert r.json()["choices"][0]["message"]["content"] == "hello from strong"
        r = chat(c, url, CHAT)
        assert r.headers["x-moekit-model"] == "weak"
        assert backends["weak"][1].state.last_body["model"] == "weak-7b"  # served_model replaces the name
        r = chat(c, url, MATH, model="router-knn-1.0")  # mu = 1: the cheapest model always
        assert r.headers["x-moekit-model"] == "weak"
        r = chat(c, url, CHAT, model="strong")  # a backend's own name goes straight there
        assert r.headers["x-moekit-model"] == "strong"
        assert [m["id"] for m in c.get(f"{url}/v1/models").json()["data"]] == ["router-knn", "weak", "strong"]
        assert c.get(f"{url}/health").json()["status"] == "ok"
        metrics = c.get(f"{url}/metrics").text
        # fake usage: 5 prompt + 4 completion tokens per answer; strong answered twice
        assert f'moekit_route_cost_dollars_total{{model="strong"}} {2 * (5 * 10 + 4 * 30) / 1e6!r}' in metrics
        assert 'moekit_route_routed_total{model="weak",router="knn"} 2.0' in metrics


def test_backend_timeout_falls_back(backends, knn):
    with start(backends, knn, "slow", timeout_s=0.3, retries=0) as url, httpx.Client(timeout=10) as c:
        r = chat(c, url, MATH)
        assert r.status_code == 200 and r.headers["x-moekit-model"] == "weak"
        assert 'moekit_route_fallbacks_total{to="weak"} 1.0' in c.get(f"{url}/metrics").text


def test_backend_5xx_is_retried_then_falls_back(backends, knn):
    broken = backends["broken"][1]
    before = broken.state.calls
    with start(backends, knn, "broken", retries=2) as url, httpx.Client(timeout=10) as c:
        r = chat(c, url, MATH)
        assert r.status_code == 200 and r.headers["x-moekit-model"] == "weak"
    assert broken.state.calls - before == 3  # first try + 2 retries


def test_every_backend_failing_is_a_502_not_a_crash(backends, knn):
    cfg = RoutesConfig.from_dict(
        {
            "backends": [
                {"model": "weak", "base_url": backends["broken"][0] + "/v1", "retries": 0},
                {"model": "strong", "base_url": backends["broken"][0] + "/v1", "retries": 0, "fallback": "weak"},
            ]
        }
    )
    with serve_in_thread(create_app(cfg, {"knn": knn})) as url, httpx.Client(timeout=10) as c:
        r = chat(c, url, MATH)
        assert r.status_code == 502 and "every backend failed" in r.json()["error"]["message"]
        assert c.get(f"{url}/health").status_code == 200


def test_malformed_and_oversized_requests_get_4xx(backends, knn):
    with start(backends, knn) as url, httpx.Client(timeout=10) as c:
        post = lambda **kw: c.post(f"{url}/v1/chat/completions", **kw)  # noqa: E731
        assert post(content=b"{not json").status_code == 400
        assert post(json=[1, 2]).status_code == 400
        assert post(json={"model": "router-knn"}).status_code == 400
        assert post(json={"model": "router-knn", "messages": "hi"}).status_code == 400
        assert post(json={"model": "router-knn", "messages": [{"content": "no role"}]}).status_code == 400
        r = post(json={"model": "router-knn", "messages": [{"role": "user", "content": "x"}], "stream": "yes"})
        assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
        r = chat(c, url, "x", model="gpt-9")
        assert r.status_code == 404 and "router-knn" in r.json()["error"]["message"]
        assert chat(c, url, "x", model="router-knn-1.5").status_code == 400
        big = chat(c, url, "x" * 30_000)
        assert big.status_code == 413
        assert chat(c, url, CHAT).status_code == 200  # still serving
        assert 'client_errors_total{status="400"}' in c.get(f"{url}/metrics").text


def test_streaming_passes_through(backends, knn):
    with start(backends, knn) as url, httpx.Client(timeout=10) as c:
        with c.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "router-knn", "stream": True, "messages": [{"role": "user", "content": MATH}]},
        ) as r:
            assert r.status_code == 200 and r.headers["x-moekit-model"] == "strong"
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == "hello from strong"
        metrics = c.get(f"{url}/metrics").text
        assert 'moekit_route_completion_tokens_total{model="strong"} 3.0' in metrics  # usage of the last event


def test_api_key_comes_from_the_environment_and_never_shows(backends, knn, monkeypatch):
    monkeypatch.setenv("MOEKIT_TEST_KEY", "sk-secret-123")
    with start(backends, knn, api_key_env="MOEKIT_TEST_KEY") as url, httpx.Client(timeout=10) as c:
        chat(c, url, MATH)
        assert backends["strong"][1].state.last_headers["authorization"] == "Bearer sk-secret-123"
        for path in ("/metrics", "/health", "/v1/models"):
            assert "sk-secret" not in c.get(url + path).text
    with pytest.raises(ValueError, match="environment variable"):
        RoutesConfig.from_dict({"backends": [{"model": "m", "base_url": "http://x", "api_key": "sk-1"}]})


def test_many_concurrent_requests_all_succeed(backends, knn):
    async def burst(url, n):
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=n)) as c:
            rs = await asyncio.gather(
                *[
                    c.post(
                        f"{url}/v1/chat/completions",
                        json={
                            "model": "router-knn",
                            "messages": [{"role": "user", "content": MATH if i % 2 else CHAT}],
                        },
                    )
                    for i in range(n)
                ]
            )
        return [r.status_code for r in rs]

    with start(backends, knn) as url:
        assert asyncio.run(asyncio.wait_for(burst(url, 50), 60)) == [200] * 50


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        RoutesConfig.from_dict({"backends": [{"model": "m", "base_url": "http://x", "colour": 1}]})
    with pytest.raises(ValueError, match="fallback: 'n' is not a backend"):
        RoutesConfig.from_dict({"backends": [{"model": "m", "base_url": "http://x", "fallback": "n"}]})
    with pytest.raises(ValueError, match="base_url"):
        RoutesConfig.from_dict({"backends": [{"model": "m", "base_url": "ftp://x"}]})
    with pytest.raises(ValueError, match="mu"):
        RoutesConfig.from_dict(
            {"backends": [{"model": "m", "base_url": "http://x"}], "routers": [{"name": "r", "path": "p", "mu": 2}]}
        )
    (tmp_path / "routes.yaml").write_text(
        "backends:\n  - {model: m, base_url: 'http://127.0.0.1:1/v1'}\nrouters:\n  - {name: r, path: run}\n"
    )
    cfg = RoutesConfig.from_file(tmp_path / "routes.yaml")
    assert cfg.routers[0].path == str(tmp_path / "run") and cfg.backends[0].timeout_s == 60.0


def test_query_text_takes_the_last_user_message():
    from moekit.llmroute.wire import query_text

    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None},
    ]
    assert query_text(msgs) == "first"
    assert query_text([{"role": "system", "content": "only system"}]) == "only system"


# --- hardening: client input, a busy event loop, broken backends, client keys, model names ------------------


def _error_of(r) -> str:
    """The message of an OpenAI-style error body (asserting its shape)."""
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    return err["message"]


def test_bad_client_input_is_a_400_and_the_connection_stays_usable(backends, knn):
    bodies = {
        "text a number": {
            "model": "router-knn",
            "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        },
        "text null": {
            "model": "router-knn",
            "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}],
        },
        "text a list": {
            "model": "router-knn",
            "messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}],
        },
        "part no object": {"model": "router-knn", "messages": [{"role": "user", "content": ["hi"]}]},
    }
    raw = {
        "lone surrogate": b'{"model": "router-knn", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "NaN literal": b'{"model": "router-knn", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "Infinity": b'{"model": "router-knn", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
        "huge number": b'{"model": "router-knn", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}',
        "not UTF-8": b'{"model": "router-knn", "messages": [{"role": "user", "content": "\xff"}]}',
    }
    with start(backends, knn) as url, httpx.Client(timeout=10) as c:
        for what, body in [*((k, json.dumps(v).encode()) for k, v in bodies.items()), *raw.items()]:
            r = c.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (what, r.status_code, r.text)
            assert _error_of(r), what
            r = chat(c, url, CHAT)  # the same client (keep-alive connection) is served next
            assert r.status_code == 200, (what, r.text)
        msgs = {w: _error_of(c.post(f"{url}/v1/chat/completions", content=b)) for w, b in raw.items()}
        assert "surrogate" in msgs["lone surrogate"] and "NaN" in msgs["NaN literal"]
        assert "finite" in msgs["huge number"]
        r = c.post(f"{url}/v1/chat/completions", json=bodies["text null"])
        assert "content[0]'.text: expected a string, found null" in _error_of(r)
        pair = b'{"model": "router-knn", "messages": [{"role": "user", "content": "\\ud83d\\ude00 weather"}]}'
        assert c.post(f"{url}/v1/chat/completions", content=pair).status_code == 200  # a surrogate pair is fine
        assert "moekit_route_failed_requests_total" not in c.get(f"{url}/metrics").text


class _SlowEmbedder:
    """Wraps an embedder: sleeps `delay_s` in encode (a large prompt's embedding) and records text lengths."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s, self.lengths = inner, delay_s, []

    def encode(self, texts):
        self.lengths.append(len(texts[0]))
        if len(texts[0]) > 1000:
            import time

            time.sleep(self.delay_s)
        return self.inner.encode(texts)


def test_routing_runs_off_the_event_loop_on_a_bounded_prompt(backends, knn):
    slow = ServedRouter("knn", knn.router, _SlowEmbedder(knn.embedder, 1.5), 0.1)
    cfg = RoutesConfig.from_dict(
        {
            "backends": [
                {"model": "weak", "base_url": backends["weak"][0] + "/v1"},
                {"model": "strong", "base_url": backends["strong"][0] + "/v1"},
            ],
            "server": {"max_route_chars": 2000},
        }
    )

    async def race(url):
        async with httpx.AsyncClient(timeout=20) as c:
            big = {"model": "router-knn", "messages": [{"role": "user", "content": MATH + " x" * 20_000}]}
            small = {"model": "weak", "messages": [{"role": "user", "content": "hi"}]}
            big_task = asyncio.create_task(c.post(f"{url}/v1/chat/completions", json=big))
            await asyncio.sleep(0.3)  # the large prompt is being routed now
            t0 = asyncio.get_running_loop().time()
            r = await c.post(f"{url}/v1/chat/completions", json=small)
            small_s = asyncio.get_running_loop().time() - t0
            return (await big_task).status_code, r.status_code, small_s

    with serve_in_thread(create_app(cfg, {"knn": slow})) as url:
        slow.embedder.lengths.clear()
        big_status, small_status, small_s = asyncio.run(asyncio.wait_for(race(url), 30))
    assert big_status == 200 and small_status == 200
    assert small_s < 1.0  # on the event loop it would wait for the whole 1.5 s embedding
    assert slow.embedder.lengths == [2000]  # 40k characters sent, 2000 of them embedded


def test_route_text_keeps_the_first_and_last_halves():
    from moekit.llmroute.wire import route_text

    assert route_text("abcdef", 6) == "abcdef"
    assert route_text("abcdefghij", 4) == "ab\nj"
    assert route_text("abcdefghij", 5) == "ab\nij"


def test_a_backend_dying_mid_stream_ends_with_an_error_event(backends, knn):
    import logging

    from moekit.llmroute.fakes import raw_backend, sse_cut_off

    first = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "half"}}]}
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    uv = logging.getLogger("uvicorn.error")
    with raw_backend(sse_cut_off([first])) as dying:
        cfg = RoutesConfig.from_dict(
            {"backends": [{"model": "weak", "base_url": dying + "/v1"}, {"model": "strong", "base_url": dying + "/v1"}]}
        )
        with serve_in_thread(create_app(cfg, {"knn": knn})) as url, httpx.Client(timeout=10) as c:
            uv.addHandler(handler)
            try:
                body = {"model": "weak", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                assert json.loads(events[0])["choices"][0]["delta"]["content"] == "half"
                assert "broke off the stream" in json.loads(events[-1])["error"]["message"]
                assert "[DONE]" not in events
                metrics = c.get(f"{url}/metrics").text
                assert "moekit_route_failed_requests_total 1.0" in metrics
                assert chat(c, url, CHAT, model="router-knn").status_code == 502  # the server still answers
            finally:
                uv.removeHandler(handler)
    tracebacks = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def test_client_keys_guard_completions_models_and_metrics(backends, knn, monkeypatch):
    monkeypatch.setenv("MOEKIT_CLIENT_KEYS", "key-one, key-two")
    cfg = RoutesConfig.from_dict(
        {
            "backends": [
                {"model": "weak", "base_url": backends["weak"][0] + "/v1"},
                {"model": "strong", "base_url": backends["strong"][0] + "/v1"},
            ]
        }
    )
    app = create_app(cfg, {"knn": knn}, api_keys_env="MOEKIT_CLIENT_KEYS")
    with serve_in_thread(app) as url, httpx.Client(timeout=10) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-one"}):
            r = c.post(
                f"{url}/v1/chat/completions",
                json={"model": "weak", "messages": [{"role": "user", "content": "hi"}]},
                headers=headers,
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert c.get(f"{url}/metrics", headers=headers).status_code == 401
            assert c.get(f"{url}/v1/models", headers=headers).status_code == 401
        assert "key-one" not in r.text
        for key in ("key-one", "key-two"):
            ok = {"authorization": f"Bearer {key}"}
            r = c.post(
                f"{url}/v1/chat/completions",
                json={"model": "weak", "messages": [{"role": "user", "content": "hi"}]},
                headers=ok,
            )
            assert r.status_code == 200
            assert "requests_total" in c.get(f"{url}/metrics", headers=ok).text
        assert c.get(f"{url}/health").status_code == 200  # liveness probes need no key
    monkeypatch.delenv("MOEKIT_CLIENT_KEYS")
    with pytest.raises(ValueError, match="MOEKIT_CLIENT_KEYS is not set"):
        create_app(cfg, {"knn": knn}, api_keys_env="MOEKIT_CLIENT_KEYS")


def test_key_check_uses_compare_digest(monkeypatch):
    import hmac

    from moekit.llmroute import server

    calls = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    assert server.key_matches("b", ["a", "b", "c"]) and not server.key_matches("z", ["a"])
    assert len(calls) == 4  # every key compared, no early exit


def test_serving_a_public_address_without_keys_warns(monkeypatch, caplog, backends, knn):
    import uvicorn

    from moekit.llmroute import server

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw["host"]))  # never binds anything
    monkeypatch.setattr(server, "RouterService", lambda config, routers=None: server.Metrics())
    cfg = RoutesConfig.from_dict({"backends": [{"model": "weak", "base_url": "http://127.0.0.1:1/v1"}]})
    with caplog.at_level("WARNING", logger="moekit.llmroute.server"):
        server.run_server(cfg, host="0.0.0.0")
        server.run_server(cfg, host="127.0.0.1")
        monkeypatch.setenv("MOEKIT_CLIENT_KEYS", "k")
        server.run_server(cfg, host="0.0.0.0", api_keys_env="MOEKIT_CLIENT_KEYS")
    warned = [r.getMessage() for r in caplog.records if "without client keys" in r.getMessage()]
    assert served == ["0.0.0.0", "127.0.0.1", "0.0.0.0"] and len(warned) == 1 and "0.0.0.0" in warned[0]
    assert server.is_loopback("::1") and server.is_loopback("localhost") and not server.is_loopback("10.0.0.1")


def test_rate_limits_pass_retry_after_through():
    app = fake_backend_app("limited", fail_status=429, fail_headers={"Retry-After": "17"})
    with serve_in_thread(app) as limited:
        cfg = RoutesConfig.from_dict({"backends": [{"model": "weak", "base_url": limited + "/v1", "retries": 0}]})
        with serve_in_thread(create_app(cfg, {})) as url, httpx.Client(timeout=10) as c:
            r = chat(c, url, "hi", model="weak")
            assert r.status_code == 429 and r.headers["retry-after"] == "17"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_stream_answered_with_html_is_a_502(backends):
    with serve_in_thread(fake_backend_app("html", html_streams=True)) as html:
        cfg = RoutesConfig.from_dict({"backends": [{"model": "weak", "base_url": html + "/v1", "retries": 0}]})
        with serve_in_thread(create_app(cfg, {})) as url, httpx.Client(timeout=10) as c:
            r = chat(c, url, "hi", model="weak", stream=True)
            assert r.status_code == 502 and "text/html, not text/event-stream" in _error_of(r)
            assert chat(c, url, "hi", model="weak").status_code == 200  # unstreamed answers are JSON, fine


def test_model_names_with_a_trade_off_in_any_float_notation(backends, knn):
    with start(backends, knn) as url, httpx.Client(timeout=10) as c:
        for model, mu in [("router-knn-1e-3", "0.001"), ("router-knn-1E-3", "0.001"), ("router-knn-.5", "0.5")]:
            r = chat(c, url, MATH, model=model)
            assert r.status_code == 200 and r.headers["x-moekit-route"] == f"router-knn@{mu}", model
        r = chat(c, url, MATH, model="router-knn-abc")
        assert r.status_code == 400 and "router-knn-<trade-off" in _error_of(r)
        for bad in ("router-knn-nan", "router-knn-2e0", "router-knn--1"):
            assert chat(c, url, MATH, model=bad).status_code == 400, bad
        assert chat(c, url, MATH, model="router-other-0.1").status_code == 404
