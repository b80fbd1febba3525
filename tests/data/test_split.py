from __future__ import annotations

import pytest

from moekit.data import Document, split_documents

from .conftest import small_docs


def test_split_is_stratified_disjoint_and_deterministic():
    docs = small_docs() + [Document(text=f"doc {i}", label="rare", source=f"r{i}") for i in range(3)]
    train, val = split_documents(docs, val_fraction=0.25, seed=3)
    assert {d.label for d in val} == {"low", "num", "rare"}
    assert sorted(d.source for d in train + val) == sorted(d.source for d in docs)
    assert not {d.source for d in train} & {d.source for d in val}
    assert sum(d.label == "low" for d in val) == 3  # round(12 * 0.25)
    assert sum(d.label == "rare" for d in val) == 1  # at least one, never all
    again = split_documents(docs, val_fraction=0.25, seed=3)
    assert (train, val) == again
    other = split_documents(docs, val_fraction=0.25, seed=4)
    assert [d.source for d in other[1]] != [d.source for d in val]


def test_split_keeps_one_domain_independent_of_others():
    docs = small_docs()
    only_low = [d for d in docs if d.label == "low"]
    _, val_all = split_documents(docs, 0.25, seed=0)
    _, val_low = split_documents(only_low, 0.25, seed=0)
    assert [d.source for d in val_all if d.label == "low"] == [d.source for d in val_low]


def test_single_document_label_is_split_head_tail_at_a_line():
    text = "\n".join(f"line {i}" for i in range(100))
    train, val = split_documents([Document(text=text, label="solo", source="s")], val_fraction=0.1)
    assert len(train) == len(val) == 1
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n")
    assert 0.05 < len(val[0].text) / len(text) < 0.15


def test_bad_fraction():
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), found 1.5"):
        split_documents(small_docs(), val_fraction=1.5)
