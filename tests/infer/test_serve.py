"""`moekit serve`: OpenAI-compatible completions on a tiny moekit run, checked against `moekit generate`."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moekit.cli.main import app as cli  # noqa: E402
from moekit.infer.engines import load_engine  # noqa: E402
from moekit.infer.serve import Job, ServeConfig, create_app  # noqa: E402
from moekit.infer.steer import steer  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_run):
    run, _ = tiny_run
    return load_engine(run, name="tiny")


@pytest.fixture()
def client(engine):
    with TestClient(create_app(engine, ServeConfig(max_tokens=12))) as c:
        yield c


def _sse(text: str) -> list[dict]:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_greedy_completion_equals_moekit_generate(tiny_run, client, engine):
    run, model = tiny_run
    body = {"model": "tiny", "prompt": "In the", "max_tokens": 10, "temperature": 0, "echo": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    out = CliRunner().invoke(cli, ["generate", str(run), "--prompt", "In the", "--max-new-tokens", "10",
                                   "--temperature", "0"])
    assert out.exit_code == 0, out.output
    assert got["choices"][0]["text"] == out.output.rstrip("\n")  # echo: prompt + completion, as generate prints
    ids = engine.encode("In the")
    ref = model.generate(torch.tensor([ids]), 10, eos_id=engine.eos_id)[0, len(ids):].tolist()
    plain = client.post("/v1/completions", json={**body, "echo": False}).json()
    assert plain["choices"][0]["text"] == engine.decode(ref)
    assert plain["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref),
                              "total_tokens": len(ids) + len(ref)}


def test_streaming_chunks_concatenate_to_the_same_text(client):
    body = {"model": "tiny", "prompt": "the word", "max_tokens": 12, "temperature": 0.9, "seed": 3}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert len(chunks) > 2 and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    msgs = [{"role": "user", "content": "was the word"}]
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "seed": 3}).json()
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "seed": 3, "stream": True})
    chunks = _sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == chat["choices"][0]["message"]["content"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 12


def test_steering_in_the_body_routes_as_steer(client, engine):
    """The served greedy text with experts disabled/forced equals generation under `steer`, and differs from plain."""
    ids = engine.encode("In the beginning")
    disable, force = {0: [0, 1, 2, 3, 4, 5]}, {2: [3]}
    with steer(engine.model, disable=disable, force=force):
        steered = engine.model.generate(torch.tensor([ids]), 12, eos_id=engine.eos_id)[0, len(ids):].tolist()
    plain = engine.model.generate(torch.tensor([ids]), 12, eos_id=engine.eos_id)[0, len(ids):].tolist()
    assert steered != plain
    body = {"model": "tiny", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0,
            "moekit": {"disable_experts": {"0": disable[0]}, "force_experts": {"2": [3]}}}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == engine.decode(steered)
    assert "forward" not in engine.model.layers[0].mlp.router.__dict__  # steering ends with the request
    top1 = {**body, "moekit": {"top_p_experts": 1.0}}
    assert client.post("/v1/completions", json=top1).json()["choices"][0]["text"] == engine.decode(plain)


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 13}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "'n'"),
        ({"model": "other", "prompt": "x"}, 404, "not found"),
        ({"model": "tiny", "prompt": "x", "moekit": {"disable_experts": {"9": [1]}}}, 400, "not an MoE layer"),
        ({"model": "tiny", "prompt": "x", "moekit": {"disable_experts": {"0": [0, 1, 2, 3, 4, 5, 6]}}}, 400, "fewer"),
        ({"model": "tiny", "prompt": "x", "moekit": {"force_experts": {"0": [99]}}}, 400, "experts 0..7"),
        ({"model": "tiny", "prompt": "x", "moekit": {"top_p_experts": 1.5}}, 400, "top_p_experts"),
        ({"model": "tiny", "prompt": "x", "moekit": {"colour": 1}}, 400, "unknown fields"),
        ({"model": "tiny", "prompt": "x " * 300}, 400, "context"),
    ],
)
def test_bad_input_gets_a_4xx_json_error(client, body, status, match):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]


def test_bad_chat_and_broken_json(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400


def test_api_keys(engine, monkeypatch):
    monkeypatch.setenv("MOEKIT_SERVE_KEYS", "k1,k2")
    with TestClient(create_app(engine, ServeConfig(max_tokens=4), api_keys_env="MOEKIT_SERVE_KEYS")) as c:
        body = {"model": "tiny", "prompt": "The", "max_tokens": 2}
        assert c.post("/v1/completions", json=body).status_code == 401
        r = c.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"authorization": "Bearer k2"}).status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer k1"}).json()["data"][0]["id"] == "tiny"
        assert c.get("/health").status_code == 200  # no key for health checks


def test_full_queue_gets_429_and_timeouts_504(engine):
    with TestClient(create_app(engine, ServeConfig(max_tokens=4, max_queue=1, timeout_s=1.0))) as c:
        service = c.app.state.service
        release, started = threading.Event(), threading.Event()

        def block(job):
            started.set()
            release.wait(10)

        loop = c.portal.call(lambda: __import__("asyncio").get_running_loop())
        service.worker.submit(Job(block, loop, float("inf")))  # the worker is busy
        assert started.wait(5)
        service.worker.submit(Job(lambda job: None, loop, float("inf")))  # the queue (1) is full
        body = {"model": "tiny", "prompt": "The", "max_tokens": 2}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        # a request that waits longer than timeout_s behind a slow job gets 504
        release2, started2 = threading.Event(), threading.Event()
        deadline = time.monotonic() + 5
        while not service.worker.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        service.worker.submit(Job(lambda job: (started2.set(), release2.wait(10)), loop, float("inf")))
        assert started2.wait(5)
        r = c.post("/v1/completions", json=body)
        release2.set()
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert c.post("/v1/completions", json=body).status_code == 200  # and the server recovers


def test_metrics_and_models_with_an_expert_cache(tiny_run):
    run, _ = tiny_run
    eng = load_engine(run, name="tiny", expert_memory="50%", policy="lfu")
    with TestClient(create_app(eng, ServeConfig(max_tokens=6))) as c:
        assert c.get("/v1/models").json()["data"] == [{"id": "tiny", "object": "model", "owned_by": "moekit"}]
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 6,
                                               "temperature": 0}).status_code == 200
        c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        text = c.get("/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.strip().splitlines())
    s = eng.offloader.stats
    assert float(lines["moekit_serve_expert_cache_hits"]) == s.hits > 0
    assert float(lines["moekit_serve_expert_cache_misses"]) == s.misses > 0
    assert float(lines["moekit_serve_expert_cache_hit_rate"]) == pytest.approx(s.hit_rate)
    assert float(lines['moekit_serve_requests_total{endpoint="completions",status="200"}']) == 1.0
    assert float(lines['moekit_serve_requests_total{endpoint="completions",status="400"}']) == 1.0
    assert float(lines["moekit_serve_completion_tokens_total"]) == 6.0
