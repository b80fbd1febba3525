"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (tests and benchmarks), bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from moekit.utils.deps import require


@contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", start_timeout_s: float = 20.0):
    """Serve `app` on `host` at a free port; yields its base URL (http://127.0.0.1:PORT) and stops it on exit."""
    uvicorn = require("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", backlog=2048)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"server on {host}:{port} did not start within {start_timeout_s} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
