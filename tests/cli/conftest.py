"""CLI tests share one small data cache (built once per session, in a temporary folder)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moekit-cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(cache_dir))
