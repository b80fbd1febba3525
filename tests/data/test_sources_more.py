"""The `libcode` and `docs` sources, `balance=False`, the default cache key and the reference data config."""

from __future__ import annotations

import collections
import hashlib
import importlib

import pytest

from moekit.data import ALL_DOMAINS, BUILTIN_DOMAINS, DataConfig, builtin_corpus, reference_data_config, sources
from moekit.data.prepare import _settings
from moekit.data.sources import (
    libcode_fingerprint,
    load_docs,
    load_libcode,
    load_pydoc_topics,
    module_docstrings,
)

HAND_WRITTEN = '''"""Module doc.

More about the module."""

import os

X = 1


class Box:
    """A box.

    Some text.
        Indented detail.
    """

    size = 3

    def open(self):
        """Open it."""
        return 1

    def close(self):
        return 2

    class Lid:
        """The lid."""


def helper():
    """Help.

    Args:
        none.
    """

    def inner():
        """Inner doc."""

    return inner


async def fetch():
    """Fetch."""
'''

EXPECTED = (
    "pkg.mod\n\nModule doc.\n\nMore about the module.\n\n"
    "pkg.mod.Box\n\nA box.\n\nSome text.\n    Indented detail.\n\n"
    "pkg.mod.Box.open\n\nOpen it.\n\n"
    "pkg.mod.Box.Lid\n\nThe lid.\n\n"
    "pkg.mod.helper\n\nHelp.\n\nArgs:\n    none.\n\n"
    "pkg.mod.helper.inner\n\nInner doc.\n\n"
    "pkg.mod.fetch\n\nFetch."
)


def test_module_docstrings_exact_text():
    assert module_docstrings(HAND_WRITTEN, "pkg.mod") == EXPECTED


def test_module_docstrings_none_or_unparsable():
    assert module_docstrings("x = 1\ndef f():\n    return 2\n", "m") == ""
    assert module_docstrings("print 'python 2'\n", "m") == ""


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package `mkfake` with a module, a subpackage, tests, a big file and a non-UTF-8 file."""
    root = tmp_path / "site" / "mkfake"
    (root / "sub").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "_vendor").mkdir()
    (root / "__init__.py").write_text('"""Fake package."""\n')
    (root / "core.py").write_text(HAND_WRITTEN)
    (root / "sub" / "__init__.py").write_text("")  # empty: skipped
    (root / "sub" / "util.py").write_text("def f():\n    return 1\n")
    (root / "tests" / "test_core.py").write_text('"""A test."""\n')
    (root / "_vendor" / "other.py").write_text('"""Vendored."""\n')
    (root / "big.py").write_text("# " + "x" * 100_001 + "\n")
    (root / "latin.py").write_bytes('"""caf\xe9"""\n'.encode("latin-1"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return root


def test_libcode_reads_package_files_verbatim_and_skips(fake_package):
    docs = load_libcode(("mkfake", "mk_not_installed"))
    assert [d.source for d in docs] == ["pkg:mkfake/__init__.py", "pkg:mkfake/core.py", "pkg:mkfake/sub/util.py"]
    assert {d.label for d in docs} == {"libcode"}
    assert docs[1].text == HAND_WRITTEN


def test_libcode_fingerprint_names_missing_and_follows_the_listing(fake_package):
    fp = libcode_fingerprint(("mkfake", "mk_not_installed"))
    assert fp["mk_not_installed"] is None
    assert fp["mkfake"]["path"] == str(fake_package)
    listing = hashlib.sha256()
    # listed: every non-empty .py up to 100 kB (latin.py too: its encoding is checked on reading, not here)
    for rel in ("__init__.py", "core.py", "latin.py", "sub/util.py"):
        listing.update(f"{rel}\0{(fake_package / rel).stat().st_size}\n".encode())
    assert fp["mkfake"]["files"] == listing.hexdigest()
    assert libcode_fingerprint(("mkfake",)) == {"mkfake": fp["mkfake"]}  # cheap and repeatable
    (fake_package / "sub" / "new.py").write_text("y = 2\n")
    assert libcode_fingerprint(("mkfake",))["mkfake"]["files"] != fp["mkfake"]["files"]
    (fake_package / "sub" / "new.py").unlink()
    (fake_package / "core.py").write_text(HAND_WRITTEN + "# one more line\n")  # same names, another size
    assert libcode_fingerprint(("mkfake",))["mkfake"]["files"] != fp["mkfake"]["files"]


def test_docs_are_topics_then_docstrings_per_module(fake_package, monkeypatch):
    monkeypatch.setattr(sources, "code_files", lambda: [])  # leave the stdlib's 600 modules out of this test
    docs = load_docs(("mkfake",))
    topics = [d for d in docs if d.source.startswith("pydoc:topics#")]
    assert docs[: len(topics)] == topics and len(topics) > 50
    assert [d.source for d in docs[len(topics) :]] == ["pkg:mkfake", "pkg:mkfake.core"]
    assert docs[-2].text == "mkfake\n\nFake package."
    assert docs[-1].text == EXPECTED.replace("pkg.mod", "mkfake.core")
    assert {d.label for d in docs} == {"docs"}


def test_pydoc_topics_are_the_language_reference():
    topics = {d.source.split("#", 1)[1]: d for d in load_pydoc_topics()}
    assert "assert" in topics and "The \"assert\" statement" in topics["assert"].text
    assert all(d.text.strip() and d.label == "docs" for d in topics.values())


def test_balance_false_keeps_each_domain_its_own_size():
    def chars(docs):
        out = collections.Counter()
        for d in docs:
            out[d.label] += len(d.text)
        return out

    # bible is ~4.2 M characters, stdlib code ~8.4 M
    balanced = chars(builtin_corpus(6_000_000, domains=("bible", "code")))
    assert balanced["code"] <= balanced["bible"] <= 4_300_000
    unbalanced = builtin_corpus(6_000_000, domains=("bible", "code"), balance=False)
    sizes = chars(unbalanced)
    assert sizes["bible"] == chars(builtin_corpus(6_000_000, domains=("bible",), balance=False))["bible"] > 4_000_000
    assert 5_900_000 < sizes["code"] <= 6_000_000
    # each domain's draw is the same whether or not the other is loaded
    alone = builtin_corpus(6_000_000, domains=("code",), balance=False)
    assert [d for d in unbalanced if d.label == "code"] == alone


def test_default_cache_settings_unchanged():
    # computed on main before `balance` existed: the default entry (and the quickstart's) must keep its key
    assert _settings(DataConfig()) == {
        "spec": "builtin",
        "vocab_size": 8192,
        "val_fraction": 0.1,
        "seed": 0,
        "max_chars_per_domain": 2_000_000,
        "domains": ["wiki", "bible", "code"],
        "min_frequency": 2,
        "tokenizer": None,
    }
    assert _settings(DataConfig(balance=False))["balance"] is False
    assert "balance" not in _settings(DataConfig(spec=["x.txt"], balance=False))
    assert BUILTIN_DOMAINS == ("wiki", "bible", "code")


def test_balance_must_be_a_bool():
    with pytest.raises(ValueError, match=r"DataConfig.balance must be True or False, found 'no'"):
        DataConfig(balance="no")


def test_reference_data_config():
    cfg = reference_data_config(seed=3)
    assert cfg.vocab_size == 2048 and cfg.seed == 3 and cfg.balance is False
    assert cfg.domains == list(ALL_DOMAINS) == ["wiki", "bible", "code", "libcode", "docs"]
    assert cfg.max_chars_per_domain == 28_000_000
