"""Compress a Hugging Face MoE checkpoint into a checkpoint transformers loads (what `moekit compress METHOD
HF_DIR` does; docs/compress.md, "Hugging Face models").

The model is loaded with transformers, patched (`moekit.hf.patch`: moekit parts holding the checkpoint's own
tensors, same logits), calibrated and pruned with the same `calibrate` / `prune` as a moekit LM, and saved
with `moekit.hf.save` (the family's own classes; the config's expert count, top-k and routing fields such as
DeepSeek's `n_group` / `topk_group` updated). A family whose config cannot hold the result is refused before
anything is written. Calibration and validation tokens come from the built-in corpus tokenized with the
checkpoint's own tokenizer, or from a file (`calibration_tokens`).

The output folder is written beside DST under a temporary name and renamed into place: a failure leaves
nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.compress.calibrate import calibrate, calibration_batches
from moekit.compress.prune import get_method, kept_count, prune
from moekit.compress.run import CompressReport, param_counts
from moekit.utils.io import replace_dir

RECORD = "moekit_compress.json"  # what was done, written beside config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
ID_SUFFIXES = (".json", ".npy")  # --calib files read as token ids; any other file is text


def family_name(model: nn.Module) -> str:
    """The `moekit.hf` family of a patched model (for messages)."""
    from moekit.hf import patched_layers

    layers = patched_layers(model)
    return layers[0].family.name if layers else type(model).__name__


def check_storable(model: nn.Module) -> dict[str, Any]:
    """The config fields `moekit.hf.save` will write; a ValueError naming the family when its transformers
    config cannot hold the patched model (per-layer expert counts, routing arguments it fixes)."""
    from moekit.hf import NotExpressible, config_updates

    try:
        return config_updates(model)
    except NotExpressible as err:
        raise ValueError(f"transformers' {family_name(model)} config cannot store the compressed model: "
                         f"{err}") from None


def save_hf(model: nn.Module, out: str | Path, *, force: bool = False, tokenizer: Any = None,
            record: dict[str, Any] | None = None) -> Path:
    """Write the patched (pruned) `model` as a transformers checkpoint folder `out` (`moekit.hf.save`), with
    `tokenizer` (its `save_pretrained`) and `record` (as RECORD), atomically; see the module docstring.
    An existing `out` is refused unless `force`; a family that cannot store the model is a ValueError."""
    from moekit.hf import save

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    check_storable(model)  # before anything is written
    created = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-compress-"))
    try:
        save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if record is not None:
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        replace_dir(tmp, out)  # an existing DST (--force) is swapped out only once the new one is whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out.parent, ignore_errors=True)
        raise
    return out


def load_tokenizer(src: str | Path) -> Any:
    """The checkpoint's own tokenizer (transformers `AutoTokenizer`), or None when it has no tokenizer files."""
    src = Path(src)
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src))


def _encode(tokenizer: Any, text: str) -> Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_tokens(tokenizer: Any, calib: str | Path | None = None, *, max_chars: int = 50_000,
                       seed: int = 0) -> dict[str, Tensor]:
    """label -> LongTensor [N] of token ids for calibration and validation:
    - `calib` None: the built-in corpus (`moekit.data.builtin_corpus`, `max_chars` per domain), each domain's
      text tokenized with `tokenizer`, labels the domains;
    - a `.json` (a list of ids, or of lists) or `.npy` (integer array) file: those token ids, label "calib";
    - any other file: its UTF-8 text, tokenized with `tokenizer`, label "calib".
    """
    if calib is None:
        if tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json); pass "
                             "--calib FILE of token ids (.json or .npy)")
        from moekit.data import builtin_corpus

        texts: dict[str, list[str]] = {}
        for doc in builtin_corpus(max_chars, seed=seed):
            texts.setdefault(doc.label, []).append(doc.text)
        return {label: _encode(tokenizer, "\n\n".join(t)) for label, t in texts.items()}
    path = Path(calib)
    if not path.is_file():
        raise FileNotFoundError(f"--calib {path}: no such file")
    if path.suffix in ID_SUFFIXES:
        if path.suffix == ".npy":
            import numpy as np

            arr = np.load(path, allow_pickle=False)
            if arr.dtype.kind not in "iu":
                raise ValueError(f"--calib {path}: expected integer token ids, found dtype {arr.dtype}")
            ids = torch.from_numpy(arr.astype("int64"))
        else:
            data = json.loads(path.read_text())
            try:
                rows = data if data and isinstance(data[0], list) else [data]
                ids = torch.tensor([i for row in rows for i in row], dtype=torch.long)
            except (TypeError, ValueError, IndexError) as err:
                raise ValueError(f"--calib {path}: expected a JSON list of token ids (or of lists), {err}") from None
        return {"calib": ids.reshape(-1)}
    if tokenizer is None:
        raise ValueError(f"--calib {path}: a text file needs the checkpoint's tokenizer, and it has none; pass "
                         "token ids (.json or .npy)")
    return {"calib": _encode(tokenizer, path.read_text(encoding="utf-8"))}


def split_tokens(tokens: dict[str, Tensor], seq_len: int, val_windows: int
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """(calibration stream [N], label -> validation windows [M, seq_len + 1]): each label's last
    `val_windows` windows of seq_len + 1 tokens are held out (fewer when it is short; none when it holds
    under 2 windows), the rest of every label joins the calibration stream."""
    calib, val = [], {}
    for label, t in tokens.items():
        w = seq_len + 1
        n = min(val_windows, len(t) // w - 1) if len(t) >= 2 * w else 0
        if n > 0:
            val[label] = t[len(t) - n * w:].view(n, w)
            t = t[: len(t) - n * w]
        calib.append(t)
    return torch.cat(calib), val


@torch.no_grad()
def hf_losses(model: nn.Module, windows: dict[str, Tensor], batch_size: int = 8) -> dict[str, float]:
    """Next-token loss of a transformers causal LM on windows [M, L + 1] per label, overall ("all",
    token-weighted) and per label (sorted)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out, total, count = {}, 0.0, 0
    try:
        for label in sorted(windows):
            w = windows[label]
            s = 0.0
            for i in range(0, len(w), batch_size):
                b = w[i:i + batch_size].to(device)
                logits = model(b[:, :-1], use_cache=False).logits.float()
                s += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"))
            n = w[:, 1:].numel()
            out[label] = s / n
            total, count = total + s, count + n
    finally:
        model.train(was)
    return {"all": total / max(count, 1), **out}


def compress_hf(method: str, src: str | Path, out: str | Path, *, ratio: float, calib: str | Path | None = None,
                calib_batches: int = 16, calib_seq_len: int = 256, calib_batch_size: int = 8,
                calib_chars: int = 50_000, val_windows: int = 8, protect_super_experts: bool = True,
                evaluate: bool = True, force: bool = False, seed: int = 0) -> CompressReport:
    """Prune the Hugging Face MoE checkpoint `src` with `method` at `ratio` and write a transformers
    checkpoint `out`; see the module docstring. Calibration: `calib_batches` batches of `calib_batch_size`
    windows of `calib_seq_len` tokens (`calibration_tokens`); validation loss before/after on each label's
    last `val_windows` windows (held out of calibration)."""
    from transformers import AutoModelForCausalLM

    import moekit.hf as mh

    get_method(method)  # unknown names fail before anything is read
    if calib_batches < 1:
        raise ValueError(f"--calib-batches must be >= 1, got {calib_batches}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if not mh.is_hf_dir(src):
        raise ValueError(f"{src}: not a Hugging Face checkpoint folder (config.json with a model_type)")
    kept_count(mh.describe(src)["num_experts"], ratio)  # a bad ratio fails before the model is read
    if calib is not None and not Path(calib).is_file():
        raise FileNotFoundError(f"--calib {calib}: no such file")
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    mh.patch(model)
    tokenizer = load_tokenizer(src)
    tokens = calibration_tokens(tokenizer, calib, max_chars=calib_chars, seed=seed)
    stream, windows = split_tokens(tokens, calib_seq_len, val_windows if evaluate else 0)
    seq_len = min(calib_seq_len, len(stream))
    cal = calibrate(model, calibration_batches(stream, calib_batches, seq_len, batch_size=calib_batch_size), seed=seed)
    before = param_counts(model)
    loss = hf_losses(model, windows) if windows else {}
    result = prune(model, method, cal, ratio=ratio, protect_super_experts=protect_super_experts)
    check_storable(model)  # a family that cannot hold the result fails before anything is written
    report = CompressReport(result, before, param_counts(model), loss)
    if windows:
        report.loss_after = hf_losses(model, windows)
    record = {**{k: v for k, v in asdict(result).items() if k != "never_routed"}, "source": str(Path(src).resolve()),
              "family": family_name(model), "calib": str(calib) if calib else "builtin",
              "calib_tokens": int(min(len(stream), calib_batches * calib_batch_size * seq_len)), "seq_len": seq_len}
    record = json.loads(json.dumps(record, default=str))  # int block keys -> str
    with _quiet_transformers():
        save_hf(model, out, force=force, tokenizer=tokenizer, record=record)
    return report


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own loading / writing progress bars off (the CLI prints its table)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
