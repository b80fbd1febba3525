"""Fixtures for the data tests: a temporary cache, small labelled corpora, a tiny trained tokenizer."""

from __future__ import annotations

import json

import pytest

from moekit.data import BPETokenizer, Document, TokenizerConfig


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test gets its own `$MOEKIT_CACHE`, so nothing touches ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEKIT_CACHE", str(cache))
    return cache


def small_docs() -> list[Document]:
    """Two labels with disjoint alphabets: 'low' is lowercase prose, 'num' is digits and spaces only."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jovial quartz".split()
    docs = []
    for i in range(12):
        text = " ".join(words[(i + j) % len(words)] for j in range(400))
        docs.append(Document(text=text, label="low", source=f"low{i}"))
        nums = " ".join(str((i * 7919 + j * 104729) % 1000) for j in range(400))
        docs.append(Document(text=nums, label="num", source=f"num{i}"))
    return docs


@pytest.fixture
def jsonl_files(tmp_path):
    """The small corpus as two JSONL files with a 'domain' field."""
    docs = small_docs()
    paths = []
    for k in range(2):
        p = tmp_path / f"part{k}.jsonl"
        with open(p, "w") as f:
            for d in docs[k::2]:
                f.write(json.dumps({"text": d.text, "domain": d.label}) + "\n")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_tokenizer() -> BPETokenizer:
    texts = [d.text for d in small_docs()] + ["def f(x):\n    return x  # comment\n"] * 20
    return BPETokenizer.train(texts, TokenizerConfig(vocab_size=320))
