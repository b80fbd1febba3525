"""Parameter and FLOP accounting: total, active per token, FLOPs per token.

Counts come from the model itself, built on PyTorch's `meta` device (shapes only, no memory), so
they stay right for every option (q/k norms, shared blocks, expert variants, routers with their own
parameters). A routed expert module's parameters count as active in the share k/E (the nominal
experts per token of its router).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.models.config import LMConfig


@dataclass
class ParamCount:
    """Counts for one model config (tied or shared tensors counted once)."""

    total: int  # every parameter
    active: int  # parameters that touch one token: all but the experts a token does not use
    embedding: int  # input embedding (and output head when untied)
    experts_total: int  # routed expert parameters
    experts_active: int  # routed expert parameters one token uses (nominal k)
    flops_per_token: int  # forward FLOPs per token at full context: 2 x active matmul params + head + attention

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def nominal_k(router: torch.nn.Module) -> float:
    """Experts per token a router asks for: its `k`, or `max_k` for variable routers, else 1."""
    for name in ("k", "max_k"):
        v = getattr(router, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
    return 1.0


def count_params(cfg: LMConfig) -> ParamCount:
    """Counts of the model `cfg` describes (built on the meta device)."""
    from moekit.models.lm import MoELM

    with torch.device("meta"):
        model = MoELM(cfg)
    seen: set[int] = set()

    def numel(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embedding = numel([model.embed_tokens.weight]) + numel([model.lm_head.weight])
    experts_total = experts_active = 0
    for mod in model.modules():
        experts = getattr(mod, "experts", None)
        if experts is None or experts is mod or not isinstance(experts, torch.nn.Module):
            continue
        routers = [getattr(mod, "router", None)] + list(getattr(mod, "routers", []) or [])
        router = next((r for r in routers if r is not None), None)
        n = numel(experts.parameters())
        E = getattr(experts, "num_experts", cfg.num_experts) or 1
        experts_total += n
        experts_active += int(n * min(1.0, nominal_k(router) / E)) if router is not None else n
    rest = numel(model.parameters())  # everything not yet counted
    total = embedding + experts_total + rest
    active = embedding + experts_active + rest
    norms = sum(p.numel() for name, p in model.named_parameters() if p.dim() < 2)
    matmul_active = active - embedding - norms
    hd = cfg.head_dim
    flops = 2 * matmul_active + 2 * cfg.vocab_size * cfg.dim + 2 * cfg.n_layers * cfg.max_seq_len * cfg.n_heads * hd
    return ParamCount(total, active, embedding, experts_total, experts_active, flops)
