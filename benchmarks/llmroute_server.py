"""Latency the router server adds per request, and 200 concurrent requests, against a local fake backend.

Three processes on 127.0.0.1: a fake OpenAI-compatible backend, the router server (kNN router over
TF-IDF, trained on the MMLU table when present, else on a synthetic table) and this client. Sequential
requests alternate between the backend directly and the router (`model: router-knn`), so both see the
same noise; added latency = p50(through router) - p50(direct). Then rounds of 200 concurrent requests.

    .venv/bin/python benchmarks/llmroute_server.py [--data ../shared/data/routellm-mmlu] [--requests 400]

Writes benchmarks/results/llmroute_server.json.

`--mixed` runs a bounded load test instead: small prompts sent one after another, first alone, then while
`--large-inflight` clients keep ~900 kB prompts in flight (all routed by kNN), against the same local fake
backend; reports p50/p99 latency of the small requests in both phases. At most `--small-requests` small
requests per phase and `--time-limit-s` seconds in all. Writes benchmarks/results/llmroute_server_mixed.json.

    .venv/bin/python benchmarks/llmroute_server.py --mixed --data ../shared/data/routellm-mmlu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRONG, WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_backend(port: int) -> None:
    import uvicorn

    from moekit.llmroute.fakes import fake_backend_app

    uvicorn.run(fake_backend_app("fake"), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def role_router(config: str, port: int) -> None:
    from moekit.llmroute.config import RoutesConfig
    from moekit.llmroute.server import run_server

    run_server(RoutesConfig.from_file(config), host="127.0.0.1", port=port)


def wait_up(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout_s} s")


def train_router(data: str, out: Path) -> str:
    from moekit.llmroute.pipeline import DataConfig, TrainConfig, train

    if Path(data).is_dir():
        train(TrainConfig(data=DataConfig(path=data), router="knn", router_args={"k": 40}), out)
        return "MMLU table (11,234 training questions as kNN references)"
    from moekit.llmroute.table import RoutingTable

    rng = np.random.default_rng(0)
    words = "integral derivative joke weather history law matrix recipe".split()
    queries = [" ".join(rng.choice(words, 8)) for _ in range(2000)]
    t = RoutingTable(queries, [WEAK, STRONG], rng.random((2000, 2)) < 0.7, np.tile([1e-4, 2e-3], (2000, 1)))
    d = out.parent / "synthetic"
    t.save(d / "table")
    from moekit.llmroute.embed import make_embedder
    from moekit.llmroute.routers import create

    emb = make_embedder("tfidf", dim=64, min_df=1).fit(queries)
    create("knn", k=40).fit(t, emb.encode(queries)).save(out)
    emb.save(out / "embedder")
    (out / "train.json").write_text(json.dumps({"config": {"data": {"path": str(d)}}}))
    return "synthetic table (2,000 queries)"


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def small_latencies(
    url: str, direct_url: str, prompts: list[str], n: int, deadline: float
) -> tuple[list[float], list[float], list]:
    """Latencies (ms) of up to `n` small requests sent one after another, stopping at `deadline`: routed by the
    server (`router-knn`), and, alternating with them, sent straight to the backend (what the machine's load
    alone costs)."""
    import httpx

    routed, direct, errors = [], [], []
    with httpx.Client(timeout=60) as c:
        for i in range(n + 5):
            if time.monotonic() > deadline:
                break
            content = prompts[i % len(prompts)]
            for out, target, model in ((routed, url, "router-knn"), (direct, direct_url, WEAK)):
                body = {"model": model, "messages": [{"role": "user", "content": content}]}
                t = time.perf_counter()
                r = c.post(f"{target}/v1/chat/completions", json=body)
                if i >= 5:  # the first 5 warm up
                    out.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    errors.append(r.status_code)
    return routed, direct, errors


def mixed_load(url: str, direct_url: str, prompts: list[str], a) -> dict:
    """Small routed requests alone, then with `a.large_inflight` large (~`a.large_kb` kB) routed prompts in flight."""
    import threading

    import httpx

    deadline = time.monotonic() + a.time_limit_s
    words = " ".join(prompts).split()
    large_text, n = [], 0
    for w in words * (1 + a.large_kb * 1000 // max(1, len(" ".join(words)))):
        if n >= a.large_kb * 1000:
            break
        large_text.append(w)
        n += len(w) + 1
    large_body = json.dumps(
        {"model": "router-knn", "messages": [{"role": "user", "content": " ".join(large_text)}]}
    ).encode()
    alone, alone_direct, errors_alone = small_latencies(url, direct_url, prompts, a.small_requests, deadline)
    stop = threading.Event()
    large_ms: list[float] = []
    large_codes: list = []

    def large_worker() -> None:  # a separate connection each, sending pre-encoded bodies until told to stop
        with httpx.Client(timeout=120) as c:
            while not stop.is_set() and time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    r = c.post(
                        f"{url}/v1/chat/completions", content=large_body, headers={"content-type": "application/json"}
                    )
                    large_codes.append(r.status_code)
                except httpx.HTTPError as exc:
                    large_codes.append(type(exc).__name__)
                large_ms.append((time.perf_counter() - t) * 1000)

    workers = [threading.Thread(target=large_worker, daemon=True) for _ in range(a.large_inflight)]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let the large prompts get going
    loaded, loaded_direct, errors_loaded = small_latencies(url, direct_url, prompts, a.small_requests, deadline)
    stop.set()
    for w in workers:
        w.join(timeout=130)
    return {
        "large_prompt_bytes": len(large_body),
        "large_inflight": a.large_inflight,
        "small_alone_ms": percentiles(alone),
        "small_alone_n": len(alone),
        "small_with_large_ms": percentiles(loaded),
        "small_with_large_n": len(loaded),
        "small_direct_to_backend_alone_ms": percentiles(alone_direct),
        "small_direct_to_backend_with_large_ms": percentiles(loaded_direct),
        "small_errors": errors_alone + errors_loaded,
        "large_completed": len(large_ms),
        "large_ok": sum(c == 200 for c in large_codes),
        "large_ms": percentiles(large_ms) if large_ms else None,
        "time_limit_s": a.time_limit_s,
    }


async def concurrent_round(url: str, n: int, prompts: list[str]) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        t0 = time.perf_counter()

        async def one(i):
            try:
                r = await c.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "router-knn", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]},
                )
                return r.status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        codes = await asyncio.gather(*[one(i) for i in range(n)])
        wall = time.perf_counter() - t0
    return {
        "requests": n,
        "ok": sum(c == 200 for c in codes),
        "errors": [c for c in codes if c != 200][:5],
        "wall_seconds": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["client", "backend", "router"], default="client", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "routellm-mmlu"))
    p.add_argument("--requests", type=int, default=400, help="sequential requests to each target")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="rounds of concurrent requests")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/llmroute_server[_mixed].json)")
    p.add_argument("--mixed", action="store_true", help="run the bounded mixed large/small load test instead")
    p.add_argument("--large-kb", type=int, default=900, help="--mixed: size of each large prompt in kB")
    p.add_argument("--large-inflight", type=int, default=4, help="--mixed: large prompts kept in flight")
    p.add_argument("--small-requests", type=int, default=200, help="--mixed: small requests in each phase")
    p.add_argument("--time-limit-s", type=float, default=240.0, help="--mixed: time limit of the load test")
    a = p.parse_args()
    name = "llmroute_server_mixed.json" if a.mixed else "llmroute_server.json"
    a.out = a.out or str(ROOT / "benchmarks" / "results" / name)
    if a.role == "backend":
        role_backend(a.port)
        return 0
    if a.role == "router":
        role_router(a.config, a.port)
        return 0

    import httpx

    from moekit.llmroute.pipeline import load_trained

    work = Path(tempfile.mkdtemp(prefix="llmroute_bench_"))
    t0 = time.perf_counter()
    source = train_router(a.data, work / "knn")
    print(f"router trained on {source} in {time.perf_counter() - t0:.1f} s", flush=True)
    bport, rport = free_port(), free_port()
    backend_url, router_url = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{rport}"
    (work / "routes.yaml").write_text(
        f"backends:\n"
        f"  - {{model: '{WEAK}', base_url: '{backend_url}/v1', timeout_s: 30}}\n"
        f"  - {{model: '{STRONG}', base_url: '{backend_url}/v1', timeout_s: 30, fallback: '{WEAK}'}}\n"
        f"routers:\n  - {{name: knn, path: knn, mu: 0.5}}\n"
    )
    me = [sys.executable, os.environ.get("MOEKIT_BENCH_SELF", str(Path(__file__).resolve()))]
    procs = [
        subprocess.Popen([*me, "--role", "backend", "--port", str(bport)]),
        subprocess.Popen([*me, "--role", "router", "--port", str(rport), "--config", str(work / "routes.yaml")]),
    ]
    try:
        wait_up(f"{backend_url}/docs")
        wait_up(f"{router_url}/health")
        if Path(a.data).is_dir():
            from moekit.llmroute.loaders import load_routellm

            prompts = load_routellm(a.data).queries[:: max(1, 14042 // 1000)][:1000]
        else:
            prompts = ["solve the integral of x squared", "tell me a joke about the weather"] * 500
        if a.mixed:
            mixed = mixed_load(router_url, backend_url, prompts, a)
            text = httpx.get(f"{router_url}/metrics").text
            print(
                f"small requests p50/p99: alone {mixed['small_alone_ms']['p50']:.1f}/"
                f"{mixed['small_alone_ms']['p99']:.1f} ms; with {a.large_inflight} x {a.large_kb} kB in flight "
                f"{mixed['small_with_large_ms']['p50']:.1f}/{mixed['small_with_large_ms']['p99']:.1f} ms "
                f"({mixed['large_completed']} large requests done, {mixed['large_ok']} ok); straight to the backend "
                f"{mixed['small_direct_to_backend_alone_ms']['p50']:.1f} ms alone, "
                f"{mixed['small_direct_to_backend_with_large_ms']['p50']:.1f} ms with the large ones in flight",
                flush=True,
            )
            mixed["server_metrics"] = [ln for ln in text.splitlines() if "routing_seconds" in ln or "failed" in ln]
            return write_result(a, source, {"mixed": mixed})
        # routing compute alone, in this process: embed one query + kNN
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # as the server does (server.blas_threads)
        trained = load_trained(work / "knn")
        route_ms = []
        for q in prompts[:300]:
            t = time.perf_counter()
            trained.router.route(trained.embedder.encode([q]), 0.5)
            route_ms.append((time.perf_counter() - t) * 1000)
        direct_ms, proxy_ms, routed_ms = [], [], []
        series = [  # (list, URL, model): the backend directly; the server naming a model; the server routing
            (direct_ms, backend_url, WEAK),
            (proxy_ms, router_url, WEAK),
            (routed_ms, router_url, "router-knn"),
        ]
        with httpx.Client(timeout=30) as c:
            for i in range(a.requests + 20):
                body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                for out, url, model in series:
                    t = time.perf_counter()
                    r = c.post(f"{url}/v1/chat/completions", json={"model": model, **body})
                    if i >= 20:  # the first 20 rounds warm up
                        out.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, r.text
        direct, proxy, routed = percentiles(direct_ms), percentiles(proxy_ms), percentiles(routed_ms)
        routing = percentiles(route_ms)
        added = routed["p50"] - direct["p50"]
        print(
            f"p50: direct {direct['p50']:.2f} ms; through the server naming a model (no routing) "
            f"{proxy['p50']:.2f} ms; routed by knn {routed['p50']:.2f} ms -> added {added:.2f} ms "
            f"(routing compute alone {routing['p50']:.2f} ms)",
            flush=True,
        )
        # routing time measured inside the server (embed + route), from its /metrics
        text = httpx.get(f"{router_url}/metrics").text
        metric = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if "router=" in ln}
        routed_n = sum(
            float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("moekit_route_routed_total")
        )
        in_server_ms = 1000 * metric.get("moekit_route_routing_seconds_sum", float("nan")) / max(routed_n, 1)
        print(f"routing inside the server: mean {in_server_ms:.2f} ms over {routed_n:.0f} requests", flush=True)
        rounds = [asyncio.run(concurrent_round(router_url, a.concurrency, prompts)) for _ in range(a.rounds)]
        for r in rounds:
            print(
                f"{r['requests']} concurrent: {r['ok']} ok, errors {r['errors']}, {r['wall_seconds']:.2f} s", flush=True
            )
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pr.kill()
    return write_result(
        a,
        source,
        {
            "sequential_requests": a.requests,
            "direct_ms": direct,
            "through_server_no_routing_ms": proxy,
            "through_router_ms": routed,
            "added_ms_p50": added,
            "routing_compute_ms": routing,
            "routing_in_server_mean_ms": in_server_ms,
            "concurrent_rounds": rounds,
            "target": "added p50 < 5 ms; 200 concurrent requests without errors",
        },
    )


def write_result(a, source: str, numbers: dict) -> int:
    import fastapi
    import httpx
    import uvicorn

    result = {
        "benchmark": "llmroute_server" + ("_mixed" if a.mixed else ""),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.system()}; client, router and "
        "fake backend share the cores",
        "versions": {
            "python": platform.python_version(),
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__,
        },
        "router": f"knn (k=40) over TF-IDF+SVD(256), {source}",
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),  # other jobs on the machine
        **numbers,
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
