"""Placing LoRA experts on a model: `attach` wraps the matching `nn.Linear` modules of any transformers model or
moekit LM in `LoRAExperts` (or, for kind "ffn", the matching feed-forward blocks in `LoRAFFNExperts`, and the
`lora_targets` linears in a plain LoRA), freezes everything else, and installs two hooks on the model: before each
forward the layers' stored routing results are cleared, after it their auxiliary losses are added to the output
(`LMOutput.aux_loss` for moekit's LM, so `moekit.train` adds them to the loss unchanged; the key
`adapter_aux_loss` of a transformers `ModelOutput`). `aux_loss(model)` reads the same sum.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moekit.adapt.config import AdaptConfig
from moekit.adapt.ffn import LoRAFFNExperts, is_ffn_block
from moekit.adapt.layer import LoRAExperts

CONFIG_ATTR = "moekit_adapt_config"  # the AdaptConfig `attach` used, kept on the model
HOOKS_ATTR = "_moekit_adapt_hooks"
ADAPTERS = (LoRAExperts, LoRAFFNExperts)  # the wrapper modules `attach` puts in place


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches a target: an exact name or dotted suffix (`q_proj` matches
    `model.layers.0.self_attn.q_proj`), or, prefixed `re:`, a regular expression matching the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the `nn.Linear` modules matching any target; a target matching none is a ValueError."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _inside_adapter(model, n)]
    chosen = []
    for t in targets:
        hit = [n for n in linears if matches(n, t)]
        if not hit:
            raise ValueError(f"targets: {t!r} matches no nn.Linear module of {type(model).__name__}; "
                             f"its linear layers include {linears[:6]}")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in linears if n in chosen]  # model order


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), ADAPTERS):
            return True
    return False


def find_blocks(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the feed-forward blocks (`moekit.adapt.ffn.is_ffn_block`) matching any target; a target matching
    none is a ValueError."""
    blocks = [n for n, m in model.named_modules() if n and is_ffn_block(m) and not _inside_adapter(model, n)]
    chosen = []
    for t in targets:
        hit = [n for n in blocks if matches(n, t)]
        if not hit:
            raise ValueError(f"targets: {t!r} matches no feed-forward block (a module with up_proj/down_proj "
                             f"linears) of {type(model).__name__}; its blocks include {blocks[:4]}")
        chosen += [n for n in hit if n not in chosen]
    return [n for n in blocks if n in chosen]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, LoRAExperts | LoRAFFNExperts]]:
    """(name, layer) of every `LoRAExperts` and `LoRAFFNExperts` in the model, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, ADAPTERS):
            yield name, m


def attach(model: nn.Module, config: AdaptConfig) -> nn.Module:
    """Wrap the target linears of `model` in place (and return it): every parameter outside the adapters is
    frozen; the adapters and routers train. A model can be adapted once (`merge_and_unload` removes adapters)."""
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("attach: the model already has LoRA experts (one adaptation per model)")
    blocks = config.kind == "ffn"
    names = find_blocks(model, config.targets) if blocks else find_targets(model, config.targets)
    plain = [n for n in find_targets(model, config.lora_targets) if not any(n.startswith(b + ".") for b in names)
             ] if config.lora_targets else []
    for p in model.parameters():
        p.requires_grad_(False)
    common = dict(num_experts=config.num_experts, rank=config.rank, alpha=config.alpha, router=config.router,
                  router_args=config.router_args, init_std=config.init_std, expert_groups=config.expert_groups,
                  localized_balance=config.localized_balance, balance_delta=config.balance_delta)
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, (LoRAFFNExperts(base=base, **common) if blocks else LoRAExperts(
            base=base, kind=config.kind, **common)).train(base.training))  # an eval model stays in eval mode
    for name in plain:
        base = model.get_submodule(name)
        _set_module(model, name, LoRAExperts(base=base, kind="experts", num_experts=1, rank=config.rank,
                                             alpha=config.alpha, router=None, router_args={},
                                             init_std=config.init_std).train(base.training))
    setattr(model, CONFIG_ATTR, config)
    setattr(model, HOOKS_ATTR, [model.register_forward_pre_hook(_clear_hook),
                                model.register_forward_hook(_output_hook)])
    return model


def _clear_hook(model: nn.Module, args: Any) -> None:
    for _, layer in adapted_layers(model):
        layer.last_aux, layer.last_routing = {}, None


def _output_hook(model: nn.Module, args: Any, output: Any) -> Any:
    aux = aux_loss(model)
    if aux is None:
        return output
    if hasattr(output, "aux_loss") and not hasattr(output, "keys"):  # moekit's LMOutput (a dataclass)
        output.aux_loss = aux if output.aux_loss is None else output.aux_loss + aux
    elif hasattr(output, "keys"):  # a transformers ModelOutput
        output["adapter_aux_loss"] = aux
    return output


def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """The routers' auxiliary losses of the last forward (already scaled), summed over layers, by name."""
    out: dict[str, Tensor] = {}
    for _, layer in adapted_layers(model):
        for k, v in layer.last_aux.items():
            out[k] = out[k] + v if k in out else v
    return out


def aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of every adapter router's auxiliary losses from the last forward; None when there are none."""
    losses = list(aux_losses(model).values())
    return torch.stack([v.float() for v in losses]).sum() if losses else None


def set_sample_groups(model: nn.Module, groups: Tensor | None) -> None:
    """Give every adapted layer the group of each sample of the next training batch (LongTensor [batch], values in
    [0, AdaptConfig.expert_groups)), which LoRAMoE's localized balancing constraint reads; None clears them."""
    if groups is not None and (not isinstance(groups, Tensor) or groups.dim() != 1 or groups.dtype != torch.long):
        raise ValueError(f"set_sample_groups: groups must be a LongTensor [batch], got "
                         f"{getattr(groups, 'dtype', type(groups).__name__)} {tuple(getattr(groups, 'shape', ()))}")
    for _, layer in adapted_layers(model):
        layer.sample_groups = groups


def check_trainable(model: nn.Module) -> int:
    """The number of trainable parameters; a ValueError when there is none (nothing would learn)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (every weight is frozen); attach "
                         "LoRA experts with moekit.adapt.attach or unfreeze the adapters")
    return n


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back (in place); only for
    mergeable layers (one expert, no router). The hooks and config are removed; base weights stay frozen."""
    layers = list(adapted_layers(model))
    bad = [n for n, layer in layers if not layer.mergeable]
    if bad:
        raise ValueError(f"merge_and_unload: {len(bad)} layers route among experts and cannot be merged into one "
                         f"weight (e.g. {bad[0]}); only a single expert without a router merges")
    for name, layer in layers:
        base = layer.base
        with torch.no_grad():
            base.weight.copy_(layer.merged_weight())
        _set_module(model, name, base)
    for h in getattr(model, HOOKS_ATTR, []):
        h.remove()
    setattr(model, HOOKS_ATTR, [])
    setattr(model, CONFIG_ATTR, None)
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor (LoRA A/B and router parameters and buffers) by its full name in the model."""
    out = {}
    for name, layer in adapted_layers(model):
        for k, v in layer.state_dict().items():
            if not k.startswith("base."):
                out[f"{name}.{k}"] = v
    return out
