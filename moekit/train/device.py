"""Where training runs: the device and the compute dtype of `TrainConfig`, resolved once per run.

Weights, optimiser state and checkpoints stay float32; "bfloat16" runs the forward passes under
`torch.autocast` (CUDA; on CPU only with `TrainConfig.bf16_on_cpu`, since it is much slower there).
Checkpoints are written from CPU copies, so a run saved on a GPU loads and resumes anywhere.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

DEVICES = ("cpu", "cuda", "cuda:N", "auto")  # the accepted spellings of TrainConfig.device
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # TrainConfig.dtype -> autocast dtype


def is_device_name(name: Any) -> bool:
    """Whether `name` is one of DEVICES ("cuda:N" with N a number)."""
    return isinstance(name, str) and (name in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", name) is not None)


def resolve_device(name: str, dtype: str = "float32", *, bf16_on_cpu: bool = False) -> torch.device:
    """The torch.device of `name` ("auto": CUDA when available, else CPU). A CUDA device this machine does not
    have, or bfloat16 on CPU without `bf16_on_cpu`, is a ValueError that says what to pass instead."""
    if not is_device_name(name):
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "cpu" and dtype == "bfloat16" and not bf16_on_cpu:
        raise ValueError(
            "dtype 'bfloat16' on CPU is refused (bf16 autocast is much slower than float32 there); use "
            "--dtype float32, a CUDA device, or --bf16-on-cpu to force it"
        )
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The context of a training forward pass: nothing for float32, else torch.autocast to `dtype`."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def to_cpu(obj: Any) -> Any:
    """`obj` (nested dicts, lists and tuples of tensors and plain data) with every tensor on CPU; tensors
    already there are returned as they are (no copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu")
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states training draws from: CPU, and the CUDA device's when training there."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_state` (a CUDA state saved on another kind of device is ignored)."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)

