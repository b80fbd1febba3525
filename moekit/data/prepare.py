"""`prepare_data`: corpus -> split -> tokenizer -> tokenised splits, built once and cached, then memory-mapped.

Cache entry: `<cache root>/data/<key>/` with `tokenizer.json`, `train/`, `val/` (see `dataset.py`) and
`meta.json` (settings, sources, versions, counts). The key hashes the sources' fingerprints (files, sizes,
modification times, package and Python versions), the settings and the library versions; the entry is built
in a temporary directory and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moekit.data.cache import atomic_dir, cache_key, cache_root, file_sha256, write_json_atomic
from moekit.data.corpus import BUILTIN_DOMAINS, DEFAULT_MAX_CHARS_PER_DOMAIN, builtin_corpus
from moekit.data.dataset import TokenDataset, write_split
from moekit.data.document import Document
from moekit.data.files import load_documents, resolve_paths
from moekit.data.progress import status
from moekit.data.sources import SOURCES
from moekit.data.split import split_documents
from moekit.data.tokenizer import EOS_TOKEN, BPETokenizer, TokenizerConfig, tokenizer_config_dict
from moekit.utils.readers import read_json_object

FORMAT_VERSION = 2  # bump when the layout of a cache entry or the way it is built changes


def _absolute(path: str | os.PathLike) -> str:
    """`path` made absolute against the working directory (`~` expanded, `..` folded, links kept)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@dataclass
class DataConfig:
    """What data to prepare and how; plain names and numbers, so it serialises to JSON with a training config."""

    spec: str | list[str] = "builtin"  # "builtin", or paths of .txt/.jsonl/.parquet files or directories
    vocab_size: int = 8192  # BPE vocabulary including 256 byte tokens and <|endoftext|>; <= 65536 stores uint16
    val_fraction: float = 0.1  # share of each label's documents held out for validation, in (0, 1)
    seed: int = 0  # drives which built-in documents are drawn and the split
    max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN  # built-in only: character budget of each domain
    domains: list[str] = field(default_factory=lambda: list(BUILTIN_DOMAINS))  # built-in only: which domains
    balance: bool = True  # built-in only: cut every domain to the smallest one's size (False: each keeps its own)
    text_field: str = "text"  # files only: JSONL field / Parquet column with the text
    label_field: str | None = None  # files only: JSONL field / Parquet column with the label (else the file stem)
    min_frequency: int = 2  # BPE: merge a pair only if it occurs at least this often
    tokenizer: str | None = None  # path of an existing tokenizer.json to use instead of training one

    def __post_init__(self) -> None:
        # paths are stored absolute, so a run's config finds its data from any working directory
        if isinstance(self.spec, str | os.PathLike) and str(self.spec) != "builtin":
            self.spec = [_absolute(self.spec)]
        elif not isinstance(self.spec, str):
            self.spec = [_absolute(p) for p in self.spec]
            if not self.spec:
                raise ValueError("DataConfig.spec must be 'builtin' or a non-empty list of paths, found []")
        if self.tokenizer is not None:
            self.tokenizer = _absolute(self.tokenizer)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in (0, 1), found {self.val_fraction}")
        if self.max_chars_per_domain < 1:
            raise ValueError(f"DataConfig.max_chars_per_domain must be >= 1, found {self.max_chars_per_domain}")
        self.domains = list(self.domains)
        if not isinstance(self.balance, bool):
            raise ValueError(f"DataConfig.balance must be True or False, found {self.balance!r}")
        bad = [d for d in self.domains if d not in SOURCES]
        if bad or not self.domains:
            raise ValueError(f"DataConfig.domains must be a non-empty subset of {list(SOURCES)}, found {self.domains}")
        if self.tokenizer is None:
            TokenizerConfig(vocab_size=self.vocab_size, min_frequency=self.min_frequency)  # checks both
        elif not Path(self.tokenizer).is_file():
            raise FileNotFoundError(
                f"DataConfig.tokenizer: expected a tokenizer JSON file at {self.tokenizer}, found nothing"
            )

    @property
    def is_builtin(self) -> bool:
        return self.spec == "builtin"


@dataclass
class PreparedData:
    """What training needs: the tokenizer, the two tokenised splits and the label names (index = label id)."""

    tokenizer: BPETokenizer
    train: TokenDataset
    val: TokenDataset
    label_names: list[str]
    directory: Path  # the cache entry
    config: DataConfig
    meta: dict  # contents of meta.json: settings, sources, versions, counts, build time

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id


def _versions() -> dict:
    def v(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"format": FORMAT_VERSION, "tokenizers": v("tokenizers"), "numpy": np.__version__, "python": sys.version}


def _fingerprint(config: DataConfig) -> dict:
    """What the sources are, cheaply (no text is read); raises on missing packages and bad paths before any write."""
    if config.is_builtin:
        sources = {d: SOURCES[d][1]() for d in config.domains}
    else:
        sources = {}
        for p in resolve_paths(config.spec):
            st = p.stat()
            sources[str(p.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if config.tokenizer is not None:
        sources["tokenizer"] = file_sha256(config.tokenizer)
    return sources


def _settings(config: DataConfig) -> dict:
    s = asdict(config)
    if config.balance:  # the default: left out, so entries keyed before the field existed are still found
        s.pop("balance")
    if config.is_builtin:
        for k in ("text_field", "label_field"):
            s.pop(k)
    else:  # the files are identified by their resolved paths in the fingerprint, however they were spelled
        for k in ("spec", "max_chars_per_domain", "domains", "balance"):
            s.pop(k, None)
    if config.tokenizer is not None:
        s.pop("vocab_size")
        s.pop("min_frequency")
    return s


def _load(config: DataConfig) -> list[Document]:
    if config.is_builtin:
        return builtin_corpus(
            config.max_chars_per_domain, seed=config.seed, domains=tuple(config.domains), balance=config.balance
        )
    return load_documents(config.spec, text_field=config.text_field, label_field=config.label_field)


def _open(directory: Path, config: DataConfig, meta: dict) -> PreparedData:
    names = meta["label_names"]
    return PreparedData(
        tokenizer=BPETokenizer.load(directory / "tokenizer.json"),
        train=TokenDataset(directory / "train", names),
        val=TokenDataset(directory / "val", names),
        label_names=names,
        directory=directory,
        config=config,
        meta=meta,
    )


def prepare_data(
    spec: str | os.PathLike | Sequence[str | os.PathLike] | DataConfig = "builtin",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **settings,
) -> PreparedData:
    """Build (first time) or open (afterwards) the tokenizer and tokenised train/validation splits.

    Args:
        spec: "builtin" for the built-in corpus (see `DataConfig.domains`), path(s) of your own files, or a
            `DataConfig`.
        cache_dir: cache root; default `$MOEKIT_CACHE`, else `~/.cache/moekit`.
        progress: show progress on stderr while building.
        **settings: other `DataConfig` fields (vocab_size, val_fraction, seed, max_chars_per_domain, domains,
            balance, text_field, label_field, min_frequency, tokenizer); not allowed together with a `DataConfig`.
    Returns:
        `PreparedData` with `.tokenizer`, `.train`, `.val` (`TokenDataset`s) and `.label_names`.
    """
    if isinstance(spec, DataConfig):
        if settings:
            raise TypeError(f"pass settings inside the DataConfig, not also as keywords: {sorted(settings)}")
        config = spec
    else:
        if not isinstance(spec, str | os.PathLike):
            spec = [str(p) for p in spec]
        config = DataConfig(spec=spec if isinstance(spec, list) else str(spec), **settings)
    # Everything that can fail on bad input is checked here, before the cache is touched.
    description = {"settings": _settings(config), "sources": _fingerprint(config), "versions": _versions()}
    directory = cache_root(cache_dir) / "data" / cache_key(description)
    if (directory / "meta.json").is_file():
        meta = read_json_object(directory / "meta.json")
        for message in meta.get("warnings", []):  # what building the entry warned about (skipped files)
            warnings.warn(message, stacklevel=2)
        return _open(directory, config, meta)

    t0 = time.perf_counter()
    with status("reading documents", progress), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = _load(config)
    for w in caught:
        warnings.warn(w.message, stacklevel=2)
    train_docs, val_docs = split_documents(docs, config.val_fraction, config.seed)
    label_names = sorted({d.label for d in docs})
    if config.tokenizer is not None:
        tokenizer = BPETokenizer.load(config.tokenizer)
    else:
        tok_config = TokenizerConfig(
            vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=(EOS_TOKEN,)
        )
        with status(f"training a byte-level BPE tokenizer (vocab {config.vocab_size})", progress):
            tokenizer = BPETokenizer.train((d.text for d in train_docs), tok_config, length=len(train_docs))
    try:
        with atomic_dir(directory) as tmp:
            tokenizer.save(tmp / "tokenizer.json")
            counts = {
                "train": write_split(
                    train_docs, tokenizer, label_names, tmp / "train", description="tokenising train", progress=progress
                ),
                "val": write_split(
                    val_docs, tokenizer, label_names, tmp / "val", description="tokenising val", progress=progress
                ),
            }
            meta = {
                **description,
                "label_names": label_names,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "counts": counts,
                "characters": {name: sum(len(d.text) for d in docs if d.label == name) for name in label_names},
                "tokenizer_config": None if config.tokenizer else tokenizer_config_dict(tok_config),
                "build_seconds": round(time.perf_counter() - t0, 2),
                "warnings": [str(w.message) for w in caught],
            }
            write_json_atomic(tmp / "meta.json", meta)
    except PermissionError as e:  # e.g. a read-only MOEKIT_CACHE
        raise PermissionError(
            e.errno, f"{e.strerror} (writing the data cache; set MOEKIT_CACHE to a writable folder)", e.filename
        ) from e
    return _open(directory, config, meta)
