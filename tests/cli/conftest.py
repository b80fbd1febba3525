"""CLI tests share one small data cache (built once per session, in a temporary folder) and one trained
micro run that tests copy before changing it."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app

SMALL = ["--vocab-size", "320", "--set", "max_chars_per_domain=60000", "--set", "eval_windows=2", "--no-progress"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moekit-cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(cache_dir))


@pytest.fixture(scope="session")
def _trained(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(cache_dir))
        args = ["train", "--preset", "micro-moe", "--out", str(run), "--steps", "2", "--seq-len", "16", *SMALL]
        r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def trained_run(_trained, tmp_path):
    """A fresh copy of a 2-step micro-moe run (checkpoint, tokenizer, logs)."""
    return shutil.copytree(_trained, tmp_path / "run")
