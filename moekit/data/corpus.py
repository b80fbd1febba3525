"""The built-in multi-domain corpus: Wikipedia articles, Bible chapters, stdlib and package source files and
documentation, each labelled."""

from __future__ import annotations

import random

from moekit.data.document import Document
from moekit.data.sources import SOURCES

BUILTIN_DOMAINS = ("wiki", "bible", "code")  # the default corpus
# Every built-in domain: the default three, the source of installed packages and their documentation.
ALL_DOMAINS = BUILTIN_DOMAINS + ("libcode", "docs")
DEFAULT_MAX_CHARS_PER_DOMAIN = 2_000_000
# A document cut to fit a domain's budget keeps at least this many characters, or is left out.
_MIN_PIECE = 200

__all__ = ["ALL_DOMAINS", "BUILTIN_DOMAINS", "DEFAULT_MAX_CHARS_PER_DOMAIN", "builtin_corpus", "cap_documents"]


def cap_documents(docs: list[Document], max_chars: int, seed: int | str) -> list[Document]:
    """A seeded random subset of `docs` of about `max_chars` characters, in the documents' original order.

    Documents are drawn in a shuffled order until the budget is spent; the one that crosses it is cut at a line
    break so the total is at most `max_chars`.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen: dict[int, Document] = {}
    left = max_chars
    for i in order:
        doc = docs[i]
        if len(doc.text) <= left:
            chosen[i] = doc
            left -= len(doc.text)
            continue
        cut = doc.text.rfind("\n", 0, left)
        if cut >= _MIN_PIECE:
            chosen[i] = Document(text=doc.text[:cut], label=doc.label, source=doc.source + " (cut)")
        break
    return [chosen[i] for i in sorted(chosen)]


def builtin_corpus(
    max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
    seed: int = 0,
    domains: tuple[str, ...] = BUILTIN_DOMAINS,
    balance: bool = True,
) -> list[Document]:
    """Labelled documents from the packages' text, read offline, grouped by domain in the order of `domains`.

    Args:
        max_chars_per_domain: character budget of each domain (whole documents drawn at random, the last one cut).
        seed: which documents are drawn.
        domains: a subset of `ALL_DOMAINS` ("wiki", "bible", "code", "libcode", "docs").
        balance: lower every domain's budget to the smallest domain's size, so domains weigh the same; when
            False each domain keeps up to `max_chars_per_domain` of its own text, whatever the others have.
    Raises:
        MissingDependency (moekit.utils.deps): a package that carries a domain's text is not installed (the
            message says what to install).
    """
    unknown = [d for d in domains if d not in SOURCES]
    if unknown or not domains:
        raise ValueError(f"domains must be a non-empty subset of {list(SOURCES)}, found {list(domains)}")
    if max_chars_per_domain < 1:
        raise ValueError(f"max_chars_per_domain must be >= 1, found {max_chars_per_domain}")
    loaded = {d: SOURCES[d][0]() for d in dict.fromkeys(domains)}
    budget = max_chars_per_domain
    if balance:
        budget = min([budget] + [sum(len(doc.text) for doc in docs) for docs in loaded.values()])
    out: list[Document] = []
    for domain, docs in loaded.items():
        # seeded per domain by name, so a domain's draw does not depend on which other domains are loaded
        out.extend(cap_documents(docs, budget, f"{seed}:{domain}"))
    return out
