"""Document-level train/validation split: seeded, stratified by label, so every domain has validation text."""

from __future__ import annotations

import random
from collections import defaultdict

from moekit.data.document import Document


def _split_one(doc: Document, val_fraction: float) -> tuple[Document | None, Document | None]:
    """A label with a single document: its head trains, its tail validates (cut at a line break if there is one)."""
    text = doc.text
    if len(text) < 2:
        return doc, None
    target = round(len(text) * (1.0 - val_fraction))
    target = min(max(target, 1), len(text) - 1)
    cut = text.rfind("\n", 0, target)
    cut = cut + 1 if cut > 0 else target
    return (
        Document(text=text[:cut], label=doc.label, source=doc.source + " (head)"),
        Document(text=text[cut:], label=doc.label, source=doc.source + " (tail)"),
    )


def split_documents(
    docs: list[Document], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, validation), each in the input order.

    Per label, `round(n * val_fraction)` documents (at least 1, at most n - 1) go to validation, chosen by a
    generator seeded with (`seed`, label) — so adding a domain never changes another domain's split.
    A label with one document is the exception: that document's last `val_fraction` (at a line break) validates.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), found {val_fraction}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        by_label[doc.label].append(i)
    val_idx: set[int] = set()
    pieces: dict[int, tuple[Document | None, Document | None]] = {}
    for label, idx in by_label.items():
        if len(idx) == 1:
            pieces[idx[0]] = _split_one(docs[idx[0]], val_fraction)
            continue
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        shuffled = idx[:]
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        val_idx.update(shuffled[:n_val])
    train, val = [], []
    for i, doc in enumerate(docs):
        if i in pieces:
            head, tail = pieces[i]
            if head is not None:
                train.append(head)
            if tail is not None:
                val.append(tail)
        elif i in val_idx:
            val.append(doc)
        else:
            train.append(doc)
    return train, val
