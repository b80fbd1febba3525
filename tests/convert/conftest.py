"""Conversion tests: tiny dense moekit LMs, and one trained micro-dense run (the CLI suite's data cache)."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.models import LMConfig, MoELM
from tests.cli.conftest import SMALL, _cache, cache_dir  # noqa: F401


def dense_lm(seed: int = 0, **over) -> MoELM:
    """A 2-layer dense LM (D 32, F 48) with random weights, in eval mode."""
    torch.manual_seed(seed)
    cfg = LMConfig(**{**dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                             ffn_hidden=48), **over})
    return MoELM(cfg).eval()


@pytest.fixture(scope="session")
def _dense_run(tmp_path_factory, cache_dir):  # noqa: F811
    run = tmp_path_factory.mktemp("dense") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(cache_dir))
        args = ["train", "--preset", "micro-dense", "--out", str(run), "--steps", "2", "--seq-len", "16", *SMALL]
        r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def dense_run(_dense_run, tmp_path):
    """A fresh copy of a 2-step micro-dense run (checkpoint, tokenizer, logs)."""
    return shutil.copytree(_dense_run, tmp_path / "run")
