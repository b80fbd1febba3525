"""Quantized routed experts of a patched Hugging Face MoE model, saved in the compressed-tensors format and
loaded back in moekit (docs/compress.md, "Quantized experts of Hugging Face models").

The routed experts of every patched block (`moekit.hf.patch`) become `QuantizedExperts` (`moekit.compress.quant`:
weight-only, symmetric, group-wise int8 or packed int2..7, compressed-tensors' own compressors), so the
patched model runs with them. `save_quantized_hf` writes OUT/{model.safetensors, config.json}: the
transformers config (expert count and routing fields updated as `moekit.hf.save` does) plus the
`quantization_config` llm-compressor writes (`quant_method: compressed-tensors`, one config group per
bit-width targeting the quantized matrices by module name, `format` naive-quantized / pack-quantized),
and the tensors under the patched model's module names:
`model.layers.{i}.mlp.experts.{e}.gate_up_proj.weight_packed` (+ `weight_scale`, `weight_shape`). The
experts' gate and up rows stay fused in one matrix, as moekit and transformers 5 hold them.
`load_quantized_hf` rebuilds the model from the config (no code from the checkpoint runs), patches it and
loads the tensors, which must match exactly. transformers itself cannot load such a checkpoint on the CPU
(docs say why).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.compress.quant import (
    QuantizedExperts,
    _bits_by_module,
    check_quant_args,
    fmt,
    load_checked,
    quantize_layer,
    quantized_like,
    scheme,
)
from moekit.utils.io import replace_dir

__all__ = ["hf_experts", "load_quantized_hf", "quantization_config_hf", "quantize_hf", "save_quantized_hf"]


def hf_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name of the experts, the patched block) for every patched block of `model`, in order."""
    from moekit.hf import PatchedMoE

    out = [(f"{name}.{m.family.experts}", m) for name, m in model.named_modules() if isinstance(m, PatchedMoE)]
    if not out:
        raise ValueError("quantize_hf: the model is not patched (call moekit.hf.patch(model) first)")
    return out


def quantize_hf(model: nn.Module, bits: int = 8, group_size: int = 128, *,
                expert_bits: Mapping[tuple[str, int], int] | None = None) -> nn.Module:
    """Quantize the routed experts of a patched Hugging Face model in place (and return it).

    bits / group_size as `moekit.compress.quantize_experts` (group_size must divide D and the expert width F);
    expert_bits: {(experts module name, expert): bits} for single experts (names from `hf_experts`).
    Routers, shared experts, attention and embeddings stay in their dtype."""
    check_quant_args(bits, group_size)
    layers = hf_experts(model)
    expert_bits = dict(expert_bits or {})
    for b in expert_bits.values():
        check_quant_args(b, group_size)
    known = {(name, e) for name, layer in layers for e in range(layer.experts.num_experts)}
    unknown = sorted(set(expert_bits) - known)
    if unknown:
        raise ValueError(f"quantize_hf: expert_bits names experts the model does not have: {unknown[:5]}")
    for name, layer in layers:
        if isinstance(layer.experts, QuantizedExperts):
            raise ValueError(f"quantize_hf: {name} is already quantized")
        for n in ("gate_up_proj", "up_proj", "down_proj"):
            w = getattr(layer.experts, n, None)
            if w is not None and w.shape[-1] % group_size:
                raise ValueError(f"quantize_hf: group_size {group_size} must divide the input width of every expert "
                                 f"matrix; {name}.{n} has width {w.shape[-1]} (no padding is done)")
    for name, layer in layers:
        per = {e: expert_bits.get((name, e), bits) for e in range(layer.experts.num_experts)}
        layer.experts = quantize_layer(layer.experts, per, group_size)
    return model


def quantization_config_hf(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` of a quantized patched model, as llm-compressor writes it into config.json."""
    from moekit.compress.quant import _ct

    groups: dict[tuple[int, int], list[str]] = {}
    for name, layer in hf_experts(model):
        if not isinstance(layer.experts, QuantizedExperts):
            raise ValueError(f"quantization_config_hf: {name} is not quantized (run quantize_hf first)")
        for e in range(layer.experts.num_local_experts):
            for n, m in layer.experts.expert(e).named_children():
                groups.setdefault((m.bits, m.group_size), []).append(f"{name}.{e}.{n}")
    config_groups = {f"group_{j}": scheme(b, g, t) for j, ((b, g), t) in enumerate(sorted(groups.items()))}
    formats = {fmt(b) for b, _ in groups}
    cfg = _ct().quantization.QuantizationConfig(
        config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed", ignore=["lm_head"],
    )
    return {**json.loads(cfg.model_dump_json()), "quant_method": "compressed-tensors"}


def save_quantized_hf(model: nn.Module, out: str | Path, *, force: bool = False) -> Path:
    """Write a quantized patched model to the folder `out` (see the module docstring), atomically: a temporary
    folder beside it renamed into place; nothing is left on failure. An existing `out` needs `force`."""
    from safetensors.torch import save_file

    from moekit.compress.hf import check_storable

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True to replace it")
    qcfg = quantization_config_hf(model)  # fails before anything is written
    updates = check_storable(model)
    config = copy.deepcopy(model.config)
    target = config.get_text_config() if hasattr(config, "get_text_config") else config
    for k, v in updates.items():
        setattr(target, k, v)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-quant-"))
    try:
        seen: set[int] = set()
        state = {}
        for k, v in model.state_dict().items():
            t = v.detach().to("cpu").contiguous()
            state[k] = t.clone() if t.data_ptr() in seen else t  # tied tensors saved as copies
            seen.add(t.data_ptr())
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {**config.to_dict(), "quantization_config": qcfg}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_quantized_hf(path: str | Path) -> nn.Module:
    """Load what `save_quantized_hf` wrote: the transformers model built from its config, patched, its routed
    experts `QuantizedExperts`; tensors must match the config exactly. In eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit.hf as mh
    from moekit.utils.readers import load_safetensors

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path / 'config.json'}: no compressed-tensors quantization_config (not written by "
                         "save_quantized_hf)")
    per_module = _bits_by_module(qcfg, path / "config.json")
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build the plain model; moekit puts the quantized experts in
    dtype = getattr(config, "dtype", None)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype if isinstance(dtype, torch.dtype) else None)
    mh.patch(model)
    for name, layer in hf_experts(model):
        layer.experts = quantized_like(layer.experts, name, per_module, path / "config.json")
    return load_checked(model, load_safetensors(path / "model.safetensors"), path)
