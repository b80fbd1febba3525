"""A user's own documents from text, JSONL or Parquet files, with an optional label column.

- `.txt`: the whole file is one document; its label is `label` if given, else the file's stem.
- `.jsonl`: one JSON object per line; the text is `obj[text_field]`, the label `obj[label_field]` when
  `label_field` is given, else `label`, else the file's stem.
- `.parquet`: one row per document, columns named like JSONL fields (needs `pyarrow`).
A directory stands for the supported files under it, in sorted order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from moekit.data.document import Document
from moekit.utils.deps import require
from moekit.utils.readers import parse_json_object

SUPPORTED = (".txt", ".jsonl", ".parquet")

PathLike = str | os.PathLike


def resolve_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files that `paths` names (directories expanded), checked to exist and to have a supported extension.

    Raises before anything is read, so bad input fails fast and nothing gets written.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError("expected at least one data path, found none")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
            if not found:
                raise FileNotFoundError(f"expected {'/'.join(SUPPORTED)} files under directory {p}, found none")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in SUPPORTED:
                raise ValueError(
                    f"unsupported data file {p}: expected one of {', '.join(SUPPORTED)}, "
                    f"found {p.suffix or 'no extension'!r}"
                )
            files.append(p)
        else:
            raise FileNotFoundError(
                f"data path {p} does not exist (expected a {'/'.join(SUPPORTED)} file or a directory)"
            )
    return files


def _load_txt(path: Path, label: str | None) -> list[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: expected UTF-8 text, found bytes that are not UTF-8 ({exc.reason} at {exc.start})"
        ) from exc
    return [Document(text=text, label=label or path.stem, source=str(path))]


def _field(row: dict, field: str, where: str, what: str) -> str:
    if field not in row:
        raise KeyError(f"{where}: expected {what} field {field!r}, found fields {sorted(row)}")
    value = row[field]
    if value is None:
        raise ValueError(f"{where}: {what} field {field!r} is null")
    if what == "text" and not isinstance(value, str):
        raise TypeError(f"{where}: expected a string in text field {field!r}, found {type(value).__name__}")
    return str(value)


def _load_jsonl(path: Path, text_field: str, label_field: str | None, label: str | None) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            row = parse_json_object(line, where, "one JSON object per line")
            text = _field(row, text_field, where, "text")
            lab = _field(row, label_field, where, "label") if label_field else (label or path.stem)
            docs.append(Document(text=text, label=lab, source=where))
    return docs


def _load_parquet(path: Path, text_field: str, label_field: str | None, label: str | None) -> list[Document]:
    pq = require("pyarrow.parquet")
    columns = pq.read_schema(path).names
    wanted = [text_field] + ([label_field] if label_field else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise KeyError(f"{path}: expected column(s) {missing}, found columns {columns}")
    table = pq.read_table(path, columns=wanted)
    texts = table.column(text_field).to_pylist()
    labels = table.column(label_field).to_pylist() if label_field else None
    docs = []
    for i, text in enumerate(texts):
        row = {text_field: text, **({label_field: labels[i]} if labels is not None else {})}
        where = f"{path}:row {i}"
        lab = _field(row, label_field, where, "label") if label_field else (label or path.stem)
        docs.append(Document(text=_field(row, text_field, where, "text"), label=lab, source=where))
    return docs


def load_documents(
    paths: PathLike | Sequence[PathLike],
    text_field: str = "text",
    label_field: str | None = None,
    label: str | None = None,
) -> list[Document]:
    """Documents from `.txt`, `.jsonl` and `.parquet` files (or directories of them), in the order given.

    Args:
        paths: one path or several; a directory means every supported file under it.
        text_field: JSONL field / Parquet column that holds the text.
        label_field: JSONL field / Parquet column that holds the domain label (values become strings).
            Without it every document of a file is labelled `label`, or the file's stem when `label` is None.
        label: fixed label for documents whose file has no label field.
    A file (or record) with no text is skipped with a warning naming it; no text at all is an error.

    Raises:
        FileNotFoundError: a path does not exist. ValueError: unsupported extension or malformed content.
        KeyError: a record lacks `text_field` or `label_field`.
    """
    if label_field is not None and label is not None:
        raise ValueError(f"pass label_field ({label_field!r}) or a fixed label ({label!r}), not both")
    docs: list[Document] = []
    files = resolve_paths(paths)
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            found = _load_txt(path, label)
        elif suffix == ".jsonl":
            found = _load_jsonl(path, text_field, label_field, label)
        else:
            found = _load_parquet(path, text_field, label_field, label)
        kept = [d for d in found if d.text.strip()]
        if not kept:
            warnings.warn(f"{path} holds no text; skipped", stacklevel=2)
        elif len(kept) < len(found):
            warnings.warn(f"{path}: skipped {len(found) - len(kept)} document(s) with no text", stacklevel=2)
        docs.extend(kept)
    if not docs:
        raise ValueError(f"no text in the data files {[str(p) for p in files]}: every document is empty")
    return docs
