"""Shared helpers for benchmark scripts: timing, environment description, atomic JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.utils.io import atomic_write_text


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str, slow_factor: float = 5.0
) -> dict:
    """Median milliseconds of each fn; rounds interleave the candidates so that machine noise hits
    all of them alike (ratios measured in one run hold even when absolute times drift). Candidates
    more than `slow_factor` times slower than the fastest stop after 3 timed runs (their ratio is
    far from any target, and they would dominate the benchmark's time)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        fastest = min((min(v) for v in times.values() if v), default=None)
        for name, fn in fns.items():
            if r >= 3 and fastest is not None and min(times[name]) > slow_factor * fastest:
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def environment() -> dict:
    """Machine and versions, recorded beside every result."""
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_text(path, json.dumps(payload, indent=2))
