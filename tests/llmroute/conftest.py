"""Shared fixtures: the synthetic routing table (see synth.py), and the MMLU data when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.llmroute.embed import TfidfConfig, TfidfEmbedder
from tests.llmroute.synth import make_synthetic

MMLU = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routellm-mmlu"


@pytest.fixture(scope="session")
def synthetic():
    """(train table, test table, embedder, x_train, x_test) of the synthetic task."""
    train = make_synthetic(60, seed=0)
    test = make_synthetic(30, seed=1)
    emb = TfidfEmbedder(TfidfConfig(dim=8, min_df=1)).fit(train.queries)
    return train, test, emb, emb.encode(train.queries), emb.encode(test.queries)


@pytest.fixture(scope="session")
def mmlu_path():
    if not MMLU.is_dir():
        pytest.skip(f"MMLU routing data not found at {MMLU}")
    return MMLU
