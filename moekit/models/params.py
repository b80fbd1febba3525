"""Parameter and FLOP accounting: total, active per token, FLOPs per token.

Counts come from the model itself, built on PyTorch's `meta` device (shapes only, no memory), so
they stay right for every option (q/k norms, shared blocks, expert variants, routers with their own
parameters). A routed expert module's parameters count as active in the share k/E: k is the
measured experts per token when the caller has it (`experts_per_token`, from a validation run), else
the router's nominal k (for a router whose number of experts varies by token, a bound: `variable_k`).
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
    experts_active: int  # routed expert parameters one token uses (measured or nominal k)
    flops_per_token: int  # forward FLOPs per token at full context: 2 x active matmul params + head + attention
    variable_k: bool = False  # some router's experts per token vary by token
    measured: bool = False  # active counts use measured experts per token, not the routers' nominal k

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def count_params(cfg: LMConfig, experts_per_token: float | None = None) -> ParamCount:
    """Counts of the model `cfg` describes (built on the meta device).

    experts_per_token: measured experts per token, the mean over MoE layers (of `EvalResult.experts_per_token`,
    logged in a run's eval.jsonl); without it each MoE layer counts its router's nominal k."""
    from moekit.layers.moe import MoE
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
    variable = False
    for mod in model.modules():
        if not isinstance(mod, MoE):
            continue
        experts, router = mod.experts, mod.router  # a Chain-of-Experts layer: its first iteration's router
        n = numel(experts.parameters())
        E = getattr(experts, "num_experts", cfg.num_experts) or 1
        experts_total += n
        variable |= bool(getattr(router, "variable_k", False))
        k = experts_per_token if experts_per_token is not None else getattr(router, "nominal_k", 1)
        experts_active += int(n * min(1.0, k / E))
    rest = numel(model.parameters())  # everything not yet counted
    total = embedding + experts_total + rest
    active = embedding + experts_active + rest
    norms = sum(p.numel() for name, p in model.named_parameters() if p.dim() < 2)
    matmul_active = active - embedding - norms
    hd = cfg.head_dim
    flops = 2 * matmul_active + 2 * cfg.vocab_size * cfg.dim + 2 * cfg.n_layers * cfg.max_seq_len * cfg.n_heads * hd
    return ParamCount(
        total, active, embedding, experts_total, experts_active, flops, variable, experts_per_token is not None
    )
