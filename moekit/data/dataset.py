"""Tokenised splits on disk (memory-mapped) and `TokenDataset`: random training windows, fixed validation windows.

One split is a directory of three arrays:
- `tokens.npy`: uint16 (uint32 when the vocabulary exceeds 65,536) — every document's ids followed by EOS,
  documents grouped by label (in `label_names` order), within a label in corpus order. Each label is therefore
  one contiguous *segment*, and a window drawn inside a segment has exactly one domain label.
- `doc_offsets.npy`: int64 [N + 1] — document n is `tokens[doc_offsets[n]:doc_offsets[n + 1]]` (its EOS included).
- `doc_labels.npy`: int32 [N] — label id of each document (an index into `label_names`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moekit.data.cache import save_npy_atomic
from moekit.data.document import Document
from moekit.data.progress import progress_bar
from moekit.data.tokenizer import BPETokenizer

_ENCODE_CHUNK = 64  # documents per encode call (one progress step)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_split(
    docs: list[Document],
    tokenizer: BPETokenizer,
    label_names: list[str],
    directory: Path,
    *,
    description: str = "tokenising",
    progress: bool = True,
) -> dict:
    """Tokenise `docs` and write the split's arrays into `directory` (each file atomically). Returns counts."""
    label_id = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({d.label for d in docs} - set(label_id))
    if unknown:
        raise ValueError(f"documents have labels {unknown} that are not in label_names {label_names}")
    order = sorted(range(len(docs)), key=lambda i: (label_id[docs[i].label], i))
    texts = [docs[i].text for i in order]
    encode = getattr(tokenizer.backend, "encode_batch_fast", tokenizer.backend.encode_batch)
    pieces: list[np.ndarray] = []
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(texts))
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start : start + _ENCODE_CHUNK]
            for enc in encode(chunk, add_special_tokens=False):
                pieces.append(np.asarray(enc.ids, dtype=dtype))
                pieces.append(eos)
            bar.advance(task, len(chunk))
    lengths = np.array([len(p) + 1 for p in pieces[0::2]], dtype=np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = np.array([label_id[docs[i].label] for i in order], dtype=np.int32)
    directory.mkdir(parents=True, exist_ok=True)
    save_npy_atomic(directory / "tokens.npy", tokens)
    save_npy_atomic(directory / "doc_offsets.npy", offsets)
    save_npy_atomic(directory / "doc_labels.npy", labels)
    per_label = {name: int(lengths[labels == i].sum()) for i, name in enumerate(label_names)}
    return {"documents": len(docs), "tokens": int(tokens.size), "tokens_per_label": per_label}


class TokenDataset:
    """One tokenised split, memory-mapped. Windows never cross from one label's segment into another's.

    `sample_batch` draws training windows uniformly over all positions whose window fits inside its segment;
    `val_windows` cuts each segment into fixed, evenly spread windows, the same on every call and every run.
    """

    def __init__(self, directory: str | Path, label_names: list[str]) -> None:
        directory = Path(directory)
        for name in ("tokens.npy", "doc_offsets.npy", "doc_labels.npy"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"expected {name} in tokenised split {directory}, found nothing")
        self.directory = directory
        self.label_names = list(label_names)
        self.tokens: np.ndarray = np.load(directory / "tokens.npy", mmap_mode="r")
        self.doc_offsets: np.ndarray = np.load(directory / "doc_offsets.npy")
        self.doc_labels: np.ndarray = np.load(directory / "doc_labels.npy")
        if self.doc_offsets[-1] != self.tokens.size or len(self.doc_offsets) != len(self.doc_labels) + 1:
            raise ValueError(
                f"{directory}: doc_offsets (last {self.doc_offsets[-1]}, {len(self.doc_offsets)} entries) do not match "
                f"tokens ({self.tokens.size}) and doc_labels ({len(self.doc_labels)} entries)"
            )
        if np.any(np.diff(self.doc_labels) < 0) or (self.doc_labels.size and self.doc_labels.max() >= len(label_names)):
            raise ValueError(f"{directory}: doc_labels must be sorted ids < {len(label_names)} ({label_names})")
        # label id -> [start, end) token range of its contiguous segment (empty when the label has no documents)
        self.segments: dict[int, tuple[int, int]] = {}
        for i in range(len(self.label_names)):
            docs = np.flatnonzero(self.doc_labels == i)
            start = int(self.doc_offsets[docs[0]]) if docs.size else 0
            end = int(self.doc_offsets[docs[-1] + 1]) if docs.size else 0
            self.segments[i] = (start, end)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def num_documents(self) -> int:
        return int(self.doc_labels.size)

    def tokens_per_label(self) -> dict[str, int]:
        return {self.label_names[i]: end - start for i, (start, end) in self.segments.items()}

    def _gather(self, starts: np.ndarray, length: int) -> torch.Tensor:
        idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random training windows.

        Returns:
            x: LongTensor [B, L] input ids; y: LongTensor [B, L] the next ids (x shifted by one);
            labels: LongTensor [B] label id of each window (an index into `label_names`).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, found {batch_size} and {seq_len}")
        ids = list(self.segments)
        # number of window starts in each segment: positions s with s + L + 1 <= end
        counts = np.array([max(0, e - s - seq_len) for s, e in self.segments.values()], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(
                f"no window of {seq_len + 1} tokens fits in any label's segment: tokens per label are "
                f"{self.tokens_per_label()}; use a shorter seq_len or more data"
            )
        cum = np.cumsum(counts)
        draws = torch.randint(int(cum[-1]), (batch_size,), generator=generator).numpy()
        seg = np.searchsorted(cum, draws, side="right")
        before = np.concatenate([[0], cum[:-1]])[seg]
        starts = np.array([self.segments[ids[k]][0] for k in seg], dtype=np.int64) + (draws - before)
        window = self._gather(starts, seq_len + 1)  # [B, L + 1]
        labels = torch.tensor([ids[k] for k in seg], dtype=torch.long)
        return window[:, :-1], window[:, 1:], labels

    def val_windows(self, seq_len: int, max_windows_per_label: int | None = None) -> dict[str, torch.Tensor]:
        """Fixed validation windows per label: label name -> LongTensor [N, L + 1] (input = [:, :-1], target = [:, 1:]).

        A segment is cut into consecutive windows with stride L, so every token but the first is a target exactly
        once; with `max_windows_per_label`, that many of them are kept, evenly spread over the segment.
        A label whose segment is shorter than L + 1 tokens gets an empty [0, L + 1] tensor.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, found {seq_len}")
        if max_windows_per_label is not None and max_windows_per_label < 1:
            raise ValueError(f"max_windows_per_label must be >= 1 or None, found {max_windows_per_label}")
        out = {}
        for i, (start, end) in self.segments.items():
            n = max(0, (end - start - 1) // seq_len)
            picks = np.arange(n, dtype=np.int64)
            if max_windows_per_label is not None and n > max_windows_per_label:
                picks = np.linspace(0, n - 1, max_windows_per_label).round().astype(np.int64)
            out[self.label_names[i]] = self._gather(start + picks * seq_len, seq_len + 1)
        return out

    def val_batches(
        self, seq_len: int, batch_size: int, max_windows_per_label: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """`val_windows` in batches: yields (label name, x [b, L], y [b, L]), labels in `label_names` order."""
        for name, windows in self.val_windows(seq_len, max_windows_per_label).items():
            for k in range(0, windows.shape[0], batch_size):
                w = windows[k : k + batch_size]
                yield name, w[:, :-1], w[:, 1:]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({self.directory}, documents={self.num_documents}, tokens={self.tokens_per_label()})"
