"""Describe a Hugging Face checkpoint directory without loading its weights: the config plus the
safetensors headers (sharded through `model.safetensors.index.json`, or one file) give layers,
experts, top-k, total and active parameters and bytes per expert. Only the JSON headers of the
safetensors files are read (a few KB each), never the tensor data; transformers is not needed.

Parameters only are counted: tensors that transformers saves but that are buffers in its models
(`BUFFERS`: DeepSeek-style `e_score_correction_bias`, MiniMax's lightning-attention decay tables) are
left out of every parameter count (reported as `buffers`; their bytes stay in `bytes_total`).

Routed expert tensors are recognised by name in the layouts transformers uses: per expert
`...layers.{i}.<block>.experts.{j}.<proj>.weight` (the hub layout `save_pretrained` writes for most
families), fused `...layers.{i}.<block>.experts.gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` (the
in-memory layout, some checkpoints), and Granite's fused `...layers.{i}.block_sparse_moe.input_linear`
/ `output_linear` (3-D; Granite's shared MLP uses the same names in 2-D). Shared experts
(`shared_expert`, `shared_experts`, `shared_mlp`) count as always active.

Active parameters per token: everything but the routed experts, plus, in each MoE layer, that layer's
routed expert parameters times k / E (rounded down).
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

# Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 0.5, "F8_E8M0": 1,
}
NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_activated_experts")

# Last name parts of tensors that checkpoints hold but that transformers' models keep as buffers,
# not parameters (every covered family's saved buffers: tests/hf/test_inspect.py checks the list).
BUFFERS = frozenset({
    "e_score_correction_bias",  # DeepSeek-V3-style routers' selection bias (GLM-4.5, dots.llm1, ...)
    "diagonal_decay", "key_decay", "query_decay", "slope_rate",  # MiniMax lightning attention
})

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.experts\.(?:gate_up_proj|down_proj|up_proj|gate_proj)(?:_bias|_blocks|_scales)?$")
_FUSED_3D = re.compile(r"\.(?:input_linear|output_linear)\.weight$")  # Granite: [E, 2F, D], [E, D, F]


def is_hf_dir(path: str | Path) -> bool:
    """A folder with a transformers `config.json` (it has `model_type`) and no moekit checkpoint."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file() or (path / "checkpoint").is_dir():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data and "model" not in data


def read_header(file: str | Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from a safetensors file's JSON header."""
    file = Path(file)
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file}: safetensors header of {n} bytes is implausible; is the file corrupt?")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_headers(path: str | Path) -> dict[str, dict[str, Any]]:
    """Headers of every tensor of the checkpoint in `path` (sharded via the index, or one file)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected model.safetensors or an index)")
    out: dict[str, dict[str, Any]] = {}
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise FileNotFoundError(f"{shard} is listed in {index.name} but missing")
        out.update(read_header(shard))
    return out


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool)), None)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(path: str | Path) -> dict[str, Any]:
    """Summary of the Hugging Face checkpoint in `path` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not is_hf_dir(path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (config.json with model_type)")
    top = json.loads((path / "config.json").read_text())
    cfg = top.get("text_config") if isinstance(top.get("text_config"), dict) else top
    headers = tensor_headers(path)

    total = total_bytes = buffers = 0
    expert_params: dict[int, int] = defaultdict(int)  # layer -> routed expert parameters
    expert_bytes: dict[int, float] = defaultdict(float)
    experts_seen: dict[int, set[int]] = defaultdict(set)  # layer -> per-expert ids
    fused_E: dict[int, int] = {}
    dtypes: dict[str, int] = defaultdict(int)
    for name, h in headers.items():
        n = _numel(h["shape"])
        b = n * DTYPE_BYTES.get(h["dtype"], 0)
        total_bytes += b
        dtypes[h["dtype"]] += n
        if name.rsplit(".", 1)[-1] in BUFFERS:
            buffers += n
            continue
        total += n
        m = _LAYER.search(name)
        per = _PER_EXPERT.search(name)
        fused = _FUSED.search(name) or (_FUSED_3D.search(name) and len(h["shape"]) == 3)
        if m and (per or fused):
            layer = int(m.group(1))
            expert_params[layer] += n
            expert_bytes[layer] += b
            if per:
                experts_seen[layer].add(int(per.group(1)))
            elif h["shape"]:
                fused_E[layer] = h["shape"][0]
    n_layers = cfg.get("num_hidden_layers") or (max((int(m.group(1)) for m in map(_LAYER.search, headers) if m),
                                                     default=-1) + 1)
    per_layer_E = {layer: fused_E.get(layer) or len(experts_seen[layer]) for layer in expert_params}
    E = _first(cfg, NUM_EXPERTS_KEYS) or (max(per_layer_E.values()) if per_layer_E else 0)
    k = _first(cfg, TOP_K_KEYS) or (1 if E else 0)
    experts_total = sum(expert_params.values())
    experts_active = sum(p * min(k, per_layer_E[layer]) // per_layer_E[layer]
                         for layer, p in expert_params.items() if per_layer_E[layer])
    bytes_per_expert = {layer: expert_bytes[layer] / per_layer_E[layer] for layer in expert_bytes if per_layer_E[layer]}
    distinct = sorted(set(bytes_per_expert.values()))
    from moekit.hf.families import family_for_model_type

    fam = family_for_model_type(cfg.get("model_type", top["model_type"]))
    return {
        "path": str(path),
        "format": "huggingface",
        "model_type": top["model_type"],
        "architectures": top.get("architectures"),
        "family": fam.name if fam else None,  # covered by moekit.hf.patch
        "layers": ["moe" if i in expert_params else "dense" for i in range(n_layers)],
        "num_experts": E,
        "top_k": k,
        "dim": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "tensors": len(headers),
        "total": total,
        "active": total - experts_total + experts_active,
        "experts_total": experts_total,
        "experts_active": experts_active,
        "buffers": buffers,  # elements of non-parameter tensors (BUFFERS), in no count above
        "bytes_total": int(total_bytes),
        # one number when every MoE layer's experts are alike, else {layer: bytes}
        "bytes_per_expert": int(distinct[0]) if len(distinct) == 1
        else {str(layer): int(v) for layer, v in bytes_per_expert.items()},
        "dtypes": dict(dtypes),
    }
