"""Reading files a user hands us: a corrupt, truncated or wrong file fails with an error that names it
(`ValueError`), not with the parser's bare message (SafetensorError, JSONDecodeError, an unpickling error)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; a missing file is FileNotFoundError, invalid JSON or another JSON value
    (a list, a number) is ValueError, both naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected a JSON object, found bytes that are not UTF-8") from e
    return parse_json_object(text, str(path))


def parse_json_object(text: str, where: str, expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in `text`; invalid JSON or another JSON value is ValueError starting
    `{where}: expected {expected}, found ...` (`where` names the file, or the file and line)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}" if "\n" in text.rstrip("\n") else f"column {e.colno}"  # one line: `where` has it
        raise ValueError(f"{where}: expected {expected}, found invalid JSON ({e.msg} at {at})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected {expected}, found a JSON {type(data).__name__}")
    return data


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file; a corrupt or truncated file is ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def check_safetensors(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file, after checking that its header is valid and that the file
    holds every byte the header promises (no tensor data is read); ValueError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def load_torch_state(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` (tensors and plain data, never code); a corrupt or truncated
    file is ValueError naming it."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")  # tensors saved on a GPU load anywhere
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        first = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable torch state file (corrupt or truncated?): {first}") from e
