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
    return _cut(streams, seq_len, windows_per_label), tokenizer


def hf_windows(data: str | list[str], tokenizer, seq_len: int, windows_per_label: int) -> dict[str, torch.Tensor]:
    """Label -> windows [N, L] tokenised with a Hugging Face tokenizer: the built-in corpus's validation
    documents (labelled by domain) or your files."""
    from moekit.data import DataConfig, builtin_corpus, load_documents, split_documents

    if data == "builtin" or data == ["builtin"]:
        cfg = DataConfig()
        _, docs = split_documents(builtin_corpus(cfg.max_chars_per_domain, seed=cfg.seed), cfg.val_fraction, cfg.seed)
    else:
        docs = load_documents(list(data))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    streams: dict[str, list[int]] = {}
    for doc in docs:
        if len(streams.get(doc.label, [])) < seq_len * windows_per_label:
            streams.setdefault(doc.label, []).extend(tokenizer(doc.text)["input_ids"] + eos)
    return _cut(streams, seq_len, windows_per_label)


def _cut(streams: dict[str, list[int]], seq_len: int, windows_per_label: int) -> dict[str, torch.Tensor]:
    out = {}
    for label, ids in streams.items():
        n = min(len(ids) // seq_len, windows_per_label)
        if n:
            out[label] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    if not out:
        raise ValueError(f"the data holds fewer than {seq_len} tokens per label: nothing to analyse")
    return out


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
    """Trace the model at `path` over `data`, compute every metric, write `out/report.html`.

    `path` is a moekit run directory, or a Hugging Face checkpoint directory of a covered family
    (loaded without remote code, patched with `moekit.hf.patch`, tokenised with its own tokenizer).
    """
    from moekit.hf import is_hf_dir

    path, out = Path(path), Path(out)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_hf_dir(path):
        model, tokenizer = _load_hf(path)
        windows = hf_windows(data, tokenizer, seq_len or 128, windows_per_label)

        def forward(m, ids):
            return m(input_ids=ids, use_cache=False)
    else:
        from moekit.train import load_model, read_meta

        model = load_model(path).eval()
        L = seq_len or read_meta(path)["train"]["seq_len"]
        windows, tokenizer = labelled_windows(data, path, L, windows_per_label)
        forward = None
    return analyze_model(
        model,
        windows,
        out,
        tokenizer=tokenizer,
        batch_size=batch_size,
        record_outputs=record_outputs,
        behaviour=behaviour,
        progress=progress,
        forward=forward,
    )


def _load_hf(path: Path):
    """A local transformers checkpoint, patched, and its tokenizer (never remote code)."""
    from moekit.hf import patch
    from moekit.utils.deps import require

    tf = require("transformers")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path} has no tokenizer files, which analysis needs to tokenise the data: {e}") from e
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False).eval()
    return patch(model), tokenizer


def analyze_model(
    model: torch.nn.Module,
    windows: dict[str, torch.Tensor],
    out: str | Path,
    *,
    tokenizer=None,
    batch_size: int = 16,
    record_outputs: bool = True,
    behaviour: tuple[str, str, str] | None = None,
    progress: bool = True,
    forward=None,
) -> Path:
    """Trace `model` (moekit LM or patched HF model) over labelled windows [N, L] and write the report."""
    out = Path(out)
    total = sum(len(w) for w in windows.values())
    info = capture(
        model,
        batches_of(windows, batch_size),
        out / "trace.parquet",
        record_outputs=record_outputs,
        progress=progress,
        total=total,
        forward=forward,
    )
    metrics = compute_metrics(Trace(info.path), behaviour=behaviour)
    metrics["trace"]["tokens"] = info.tokens
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else None
    return write_report(metrics, out, decode=decode)
