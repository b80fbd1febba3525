"""Expert offloading for Hugging Face MoE checkpoints, patched with moekit parts (`moekit.hf.patch`).

The model is built with empty (meta) parameters (accelerate's `init_empty_weights`: buffers such as
rotary tables are computed as usual), patched, and each patched layer's `Experts` is replaced by an
`OffloadedExperts` reading from the checkpoint's safetensors shards, as `moekit.infer.offload` does for
moekit runs; every other tensor is then loaded. Expert tensors are found in either layout transformers
uses: fused `<experts>.gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]`, or one tensor per expert
(`<experts>.{e}.gate_proj.weight`, `up_proj`, `down_proj`, or Mixtral's `w1` (gate), `w3` (up), `w2`
(down): the layout `save_pretrained` writes), under the module's name or its hub name (`LEGACY_NAMES`:
Mixtral's block is `block_sparse_moe` on the hub and `mlp` in transformers 5). Results equal the patched
resident model's exactly (same `loop` computation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.analyze.trace import moe_layers
from moekit.infer.offload import ExpertLayout, OffloadedExperts, SafetensorsExperts, _offloader
from moekit.utils.deps import require

# in-memory name part -> the names hub checkpoints may use for it instead
LEGACY_NAMES: dict[str, tuple[str, ...]] = {".mlp.": (".block_sparse_moe.",)}
# per-expert tensor names (gate, up, down) under `<experts>.{e}.`
PER_EXPERT: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> shard holding it (via model.safetensors.index.json, or the single file)."""
    from moekit.hf.inspect import read_header

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected model.safetensors or an index)")
    return {k: f for f in files for k in read_header(f)}


def _spellings(name: str) -> list[str]:
    out = [name]
    for part, alts in LEGACY_NAMES.items():
        if part in name:
            out += [name.replace(part, alt) for alt in alts]
    return out


def _layout(experts_name: str, files: dict[str, Path], gated: bool) -> ExpertLayout:
    for prefix in _spellings(experts_name):
        first = f"{prefix}.gate_up_proj" if gated else f"{prefix}.up_proj"
        if first in files and f"{prefix}.down_proj" in files:
            return ExpertLayout(fused=(first, f"{prefix}.down_proj"))
        for gate, up, down in PER_EXPERT:
            if f"{prefix}.0.{up}.weight" in files and f"{prefix}.0.{down}.weight" in files:
                g = f"{prefix}.{{e}}.{gate}.weight" if gated else None
                return ExpertLayout(per_expert=(g, f"{prefix}.{{e}}.{up}.weight", f"{prefix}.{{e}}.{down}.weight"))
    raise ValueError(f"no expert tensors for {experts_name} in the checkpoint (fused or per-expert layout)")


def load_offloaded_hf(
    path: str | Path,
    *,
    expert_memory: str | int | float,
    policy: str = "lru",
    prefetch: bool = False,
    prefetch_k: int | None = None,
    calibration: Any = None,
    device: str | torch.device = "cpu",
    **from_config: Any,
) -> nn.Module:
    """A Hugging Face MoE causal LM from checkpoint folder `path`, patched (`moekit.hf.patch`, the family's own
    routing), with its routed experts offloaded under `expert_memory` (arguments as `load_offloaded`;
    `from_config`: keyword arguments of `AutoModelForCausalLM.from_config`, e.g. attn_implementation).
    Returns the model in eval mode with `model.offloader`."""
    tf = require("transformers")
    accelerate = require("accelerate")
    from moekit.hf import patch

    path, device = Path(path), torch.device(device)
    config = tf.AutoConfig.from_pretrained(str(path))
    with accelerate.init_empty_weights():
        model = tf.AutoModelForCausalLM.from_config(config, **from_config)
    patch(model)
    files = checkpoint_files(path)
    names = {id(m): n for n, m in model.named_modules()}
    moes = moe_layers(model)
    layouts = {idx: _layout(names[id(moe.experts)], files, moe.experts.gated) for idx, _, moe in moes}
    reader = SafetensorsExperts(files, layouts, device)
    k = max(moe.router.nominal_k for _, _, moe in moes)
    E = max(moe.experts.num_experts for _, _, moe in moes)
    _, off = _offloader(reader, [i for i, _, _ in moes], E, k, expert_memory, policy, prefetch, prefetch_k,
                        calibration)
    for idx, _, moe in moes:
        moe.experts = OffloadedExperts(like=moe.experts, layer=idx, offloader=off, dtype=reader.dtype(idx))
    state, missing = {}, []
    for key in model.state_dict():
        name = next((s for s in _spellings(key) if s in files), None)
        if name is None:
            missing.append(key)
        else:
            state[key] = reader.tensor(name)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(set(missing) - tied)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ValueError(f"{path}: tensors not loaded: {still[:5]}")
    model.offloader = off
    return model.to(device).eval()


__all__ = ["checkpoint_files", "load_offloaded_hf"]
