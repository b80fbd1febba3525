"""`analyze_run`: trace a trained model over labelled data and write the routing report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moekit.analyze.report import compute_metrics, write_report
from moekit.analyze.table import Trace
from moekit.analyze.trace import capture


def labelled_windows(
    data: str | list[str], run_dir: Path, seq_len: int, windows_per_label: int
) -> tuple[dict[str, torch.Tensor], object]:
    """label -> token windows [N, L], and the tokenizer. `data`: "builtin" (the run's own validation
    split) or text/JSONL/Parquet files (tokenised with the run's tokenizer, labelled as moekit.data does)."""
    from moekit.data import BPETokenizer, DataConfig, load_documents, prepare_data
    from moekit.train import read_meta

    meta = read_meta(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if data == "builtin" or data == ["builtin"]:
        prepared = prepare_data(DataConfig(**meta["data"]), progress=False)
        wins = prepared.val.val_windows(seq_len, max_windows_per_label=windows_per_label)
        return {label: w[:, :-1] for label, w in wins.items() if len(w)}, prepared.tokenizer
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} is missing: cannot tokenise your files for this run")
    tokenizer = BPETokenizer.load(tok_path)
    docs = load_documents(list(data))
    streams: dict[str, list[int]] = {}
    for doc in docs:
        streams.setdefault(doc.label, []).extend(tokenizer.encode(doc.text) + [tokenizer.eos_id])
    out = {}
    for label, ids in streams.items():
        n = min(len(ids) // seq_len, windows_per_label)
        if n:
            out[label] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    if not out:
        raise ValueError(f"the data holds fewer than {seq_len} tokens per label: nothing to analyse")
    return out, tokenizer


def batches_of(
    windows: dict[str, torch.Tensor], batch_size: int
) -> Iterator[tuple[torch.Tensor, dict[str, list[str]]]]:
    for label, w in windows.items():
        for i in range(0, len(w), batch_size):
            chunk = w[i : i + batch_size]
            yield chunk, {"label": [label] * len(chunk)}


def analyze_run(
    path: str | Path,
    out: str | Path,
    *,
    data: str | list[str] = "builtin",
    seq_len: int | None = None,
    windows_per_label: int = 64,
    batch_size: int = 16,
    record_outputs: bool = True,
    behaviour: tuple[str, str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Trace the moekit run at `path` over `data`, compute every metric, write `out/report.html`."""
    from moekit.train import load_model, read_meta

    path, out = Path(path), Path(out)
    model = load_model(path).eval()
    L = seq_len or read_meta(path)["train"]["seq_len"]
    windows, tokenizer = labelled_windows(data, path, L, windows_per_label)
    total = sum(len(w) for w in windows.values())
    info = capture(
        model,
        batches_of(windows, batch_size),
        out / "trace.parquet",
        record_outputs=record_outputs,
        progress=progress,
        total=total,
    )
    metrics = compute_metrics(Trace(info.path), behaviour=behaviour)
    metrics["trace"]["tokens"] = info.tokens
    return write_report(metrics, out, decode=lambda t: tokenizer.decode([t]))
