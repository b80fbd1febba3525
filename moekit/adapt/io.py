"""Saving and loading adapters.

moekit's format (a folder): `adapt_config.json` ({"format": "moekit-adapt", "version": 1, "config": AdaptConfig,
"layers": [names]}) and `adapters.safetensors` (every adapter tensor by its name in the model). Loading reads JSON
and tensors only (never code) and rebuilds the adapters with `attach`, so routers come back by registered name.

peft's LoRA format (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight [r, in]` / `.lora_B.weight [out, r]`): `save_peft` writes a plain LoRA
(one expert, no router) that `peft.PeftModel.from_pretrained` loads; `load_peft_expert` reads such an adapter into
one expert of an adapted model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapt.config import AdaptConfig
from moekit.adapt.model import CONFIG_ATTR, adapted_layers, adapter_state, attach
from moekit.utils.io import atomic_write, atomic_write_text

CONFIG_FILE = "adapt_config.json"
WEIGHTS_FILE = "adapters.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _config_of(model: nn.Module) -> AdaptConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, AdaptConfig):
        raise ValueError(f"{type(model).__name__} has no LoRA experts (use moekit.adapt.attach first)")
    return config


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def save_adapters(model: nn.Module, out: str | Path) -> Path:
    """Write the model's adapters (LoRA tensors and routers) to folder `out`; returns it."""
    config = _config_of(model)
    out = Path(out)
    _save_tensors(out / WEIGHTS_FILE, adapter_state(model), {"format": "moekit-adapt"})
    meta = {"format": "moekit-adapt", "version": 1, "config": config.to_dict(),
            "layers": [n for n, _ in adapted_layers(model)]}
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def read_adapt_config(folder: str | Path) -> AdaptConfig:
    """The AdaptConfig in `folder/adapt_config.json`; errors name the file."""
    f = Path(folder) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no such file (not a folder written by moekit.adapt.save_adapters)")
    meta = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != "moekit-adapt" or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{f}: expected {{\"format\": \"moekit-adapt\", \"config\": {{...}}}}")
    try:
        return AdaptConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: bad adapter config: {e}") from e


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach the adapters saved in `folder` to `model` (the same base architecture) and load their tensors;
    every tensor must match (names and shapes), or a ValueError lists what differs."""
    folder = Path(folder)
    config = read_adapt_config(folder)
    attach(model, config)
    state = load_file(str(folder / WEIGHTS_FILE))
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the model's adapters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    return model


def save_peft(model: nn.Module, out: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write a plain LoRA (every layer one expert without a router) in peft's adapter format."""
    config = _config_of(model)
    layers = list(adapted_layers(model))
    bad = [n for n, layer in layers if not layer.mergeable]
    if bad:
        raise ValueError(f"save_peft: peft's LoRA format holds one update per layer; {bad[0]} routes among "
                         f"{layers[0][1].num_experts} experts (use save_adapters)")
    tensors = {}
    for name, layer in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[0]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[0]
    out = Path(out)
    _save_tensors(out / PEFT_WEIGHTS, tensors, {"format": "pt"})
    peft_config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}), "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    atomic_write_text(out / PEFT_CONFIG, json.dumps(peft_config, indent=2) + "\n")
    return out


def load_peft_expert(model: nn.Module, folder: str | Path, *, expert: int = 0) -> nn.Module:
    """Load the LoRA adapter in peft's format in `folder` into expert `expert` of every adapted layer it covers.

    The adapter's rank must equal the experts' rank; its scaling lora_alpha / r (or lora_alpha / sqrt(r) with
    rslora) is folded into B so the expert computes exactly the adapter's update. Layers the adapter has no
    tensors for keep their expert; tensors for a layer that is not adapted are an error."""
    folder = Path(folder)
    cfg_file = folder / PEFT_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no such file (not a peft adapter folder)")
    pc = json.loads(cfg_file.read_text(encoding="utf-8"))
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type must be 'LORA', got {pc.get('peft_type')!r}")
    if pc.get("rank_pattern") or pc.get("alpha_pattern") or pc.get("use_dora") or pc.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_file}: rank_pattern, alpha_pattern, DoRA and fan_in_fan_out are not supported")
    r = int(pc["r"])
    scale = float(pc["lora_alpha"]) / (r ** 0.5 if pc.get("use_rslora") else r)
    state = load_file(str(folder / PEFT_WEIGHTS))
    layers = dict(adapted_layers(model))
    found = set()
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if name not in layers:
            raise ValueError(f"{folder / PEFT_WEIGHTS}: {name!r} is not an adapted layer of the model")
        found.add(name)
        layer = layers[name]
        if layer.kind != "experts" or not 0 <= expert < layer.lora_A.shape[0]:
            raise ValueError(f"load_peft_expert: {name} has no separate expert {expert} (kind {layer.kind!r}, "
                             f"{layer.lora_A.shape[0]} A matrices)")
        if r != layer.rank:
            raise ValueError(f"{cfg_file}: rank r={r} differs from the experts' rank {layer.rank}")
        a, b = state[key], state[f"{key[: -len('.lora_A.weight')]}.lora_B.weight"]
        with torch.no_grad():
            layer.lora_A[expert].copy_(a)
            layer.lora_B[expert].copy_(b * (scale / layer.scaling))
    if not found:
        raise ValueError(f"{folder / PEFT_WEIGHTS}: no LoRA tensors (keys ending in .lora_A.weight)")
    return model
