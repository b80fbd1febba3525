"""`Document`: one piece of text with its domain label and where it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document of a corpus; the split and the domain labels work on whole documents."""

    text: str  # the document's text, exactly as it will be tokenised
    label: str  # domain label, e.g. "wiki", "bible", "code", or a user's label column value
    source: str  # where it came from, for people: "gensim:<file>#<title>", "stdlib:json/decoder.py", "<path>:<line>"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Document.text must be a str, found {type(self.text).__name__}")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"Document.label must be a non-empty str, found {self.label!r}")
        if not isinstance(self.source, str):
            raise TypeError(f"Document.source must be a str, found {type(self.source).__name__}")
