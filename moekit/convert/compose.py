"""What every composition method shares (Branch-Train-Mix, router from prompts, Nexus): check that several dense
LMs have one architecture, and build the MoE LM whose expert e in every block is the feed-forward of dense model
e, with the rest (embeddings, attention, norms) given as one state dict. The methods differ only in how they make
that rest (averaged, or one base model's) and the router rows, which they write afterwards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from moekit.convert.source import check_dense
from moekit.models import LMConfig, MoELM

FFN = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def check_same_architecture(models: Sequence[MoELM], who: str) -> LMConfig:
    """The common config of `models` (each a dense gated LM); a ValueError naming the first field that differs."""
    if len(models) < 1:
        raise ValueError(f"{who}: give at least one dense model, got none")
    for i, m in enumerate(models):
        check_dense(m, f"{who} (model {i})")
    ref = models[0].config.to_dict()
    for i, m in enumerate(models[1:], start=1):
        other = m.config.to_dict()
        diff = [f"{k}: {ref[k]!r} vs {other[k]!r}" for k in ref if ref[k] != other[k]]
        if diff:
            raise ValueError(f"{who}: model {i} has another architecture than model 0 ({'; '.join(diff[:4])}); "
                             "every model must share one config")
    return models[0].config


def average_state(models: Sequence[MoELM], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The weighted average (default: mean) of every non-FFN tensor of `models` (embeddings, attention, norms)."""
    w = [1.0 / len(models)] * len(models) if weights is None else [float(v) for v in weights]
    states = [m.state_dict() for m in models]
    out = {}
    for key, t in states[0].items():
        if ".mlp." in key:
            continue
        out[key] = sum(wi * s[key].float() for wi, s in zip(w, states, strict=True)).to(t.dtype)
    return out


def ffn_experts(models: Sequence[MoELM], layer: int) -> tuple[Tensor, Tensor]:
    """Block `layer`'s FFN of each dense model as fused experts: gate_up_proj [E, 2F, D] (gate rows, then up rows),
    down_proj [E, D, F]."""
    gate_up, down = [], []
    for m in models:
        mlp = m.layers[layer].mlp
        gate_up.append(torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]))
        down.append(mlp.down_proj.weight.detach())
    return torch.stack(gate_up), torch.stack(down)


@torch.no_grad()
def compose(experts: Sequence[MoELM], rest: dict[str, Tensor], *, router: str, router_args: dict[str, Any],
            shared: MoELM | None = None, who: str = "compose") -> MoELM:
    """An MoE LM of the dense models' architecture: in every block, expert e is `experts[e]`'s FFN, the optional
    shared expert is `shared`'s FFN, every other tensor is `rest[key]`; routers `router(**router_args)` as built
    (the caller writes their rows). The models must share one config (`check_same_architecture`)."""
    cfg = check_same_architecture([*experts, *([shared] if shared is not None else [])], who)
    new_cfg = cfg.replace(num_experts=len(experts), expert_hidden=cfg.ffn_hidden, router=router,
                          router_args=dict(router_args), num_shared_experts=int(shared is not None),
                          shared_gate=False, first_k_dense=0, moe_every=1)
    p = next(experts[0].parameters())
    model = MoELM(new_cfg).to(dtype=p.dtype)
    out = model.state_dict()
    filled = set()
    for key, t in rest.items():
        if key not in out or out[key].shape != t.shape:
            raise ValueError(f"{who}: tensor {key} {tuple(t.shape)} does not fit the MoE model")
        out[key].copy_(t)
        filled.add(key)
    for i in range(new_cfg.n_layers):
        pre = f"layers.{i}.mlp."
        gate_up, down = ffn_experts(experts, i)
        out[pre + "experts.gate_up_proj"].copy_(gate_up)
        out[pre + "experts.down_proj"].copy_(down)
        filled |= {pre + "experts.gate_up_proj", pre + "experts.down_proj"}
        if shared is not None:
            for name in FFN:
                out[pre + "shared_experts." + name].copy_(shared.state_dict()[f"{pre}{name}"])
                filled.add(pre + "shared_experts." + name)
    if new_cfg.tie_embeddings:
        filled.add("lm_head.weight")
    left = sorted(k for k in set(out) - filled if ".mlp.router." not in k)
    if left:
        raise ValueError(f"{who}: no source for {left[:5]}")
    return model.train(experts[0].training)
