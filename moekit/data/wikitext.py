"""Turn MediaWiki markup into plain prose: a small regex cleaner for the built-in Wikipedia sample.

It keeps the article's sentences, headings and list items, and drops what a reader would not read
as prose: templates, tables, references, files, categories, HTML comments and the trailing
"References" / "External links" sections. It is written for well-formed dumps, not every edge of wikitext.
"""

from __future__ import annotations

import html
import re

# Sections from which on an article is bibliography and link lists, not prose.
_TAIL_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "notes and references",
    "citations",
}
# Link namespaces whose links are dropped whole (media, categories, interwiki to other languages).
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def _innermost(pattern: re.Pattern[str], repl, text: str, max_rounds: int = 20) -> str:
    """Apply `pattern` until nothing changes, so nested constructs go from the inside out."""
    for _ in range(max_rounds):
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def _link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def _cut_tail_sections(text: str) -> str:
    for m in _HEADING.finditer(text):
        if m.group(2).strip().lower() in _TAIL_SECTIONS:
            return text[: m.start()]
    return text


def clean_wikitext(markup: str) -> str:
    """Plain text of one article's wikitext (headings kept as their own lines, paragraphs by blank lines)."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _innermost(_TEMPLATE, "", text)
    text = _innermost(_TABLE, "", text)
    text = _cut_tail_sections(text)
    text = _innermost(_LINK, _link, text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    text = _LIST_MARK.sub("", text)
    text = _SPACES.sub(" ", text)
    lines = [line.strip() for line in text.split("\n")]
    # Drop leftovers of broken markup (lines of bare punctuation such as "}}" or "|}").
    lines = [line for line in lines if not line or any(c.isalnum() for c in line)]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()
