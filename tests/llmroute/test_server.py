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
    from moekit.llmroute.server import query_text

    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None},
    ]
    assert query_text(msgs) == "first"
    assert query_text([{"role": "system", "content": "only system"}]) == "only system"
