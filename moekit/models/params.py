"""Parameter and FLOP accounting: total, active per token, FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.models.config import LMConfig


@dataclass
class ParamCount:
    """Counts for one model config (embeddings counted once when tied)."""

    total: int  # every parameter
    active: int  # parameters that touch one token: all but the experts a token does not use
    embedding: int  # input embedding (and output head when untied)
    experts_total: int  # routed expert parameters
    experts_active: int  # routed expert parameters one token uses (nominal k)
    flops_per_token: (
        int  # forward FLOPs per token at full context: 2 * active non-embedding matmul params + head + attention
    )

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def router_facts(cfg: LMConfig) -> tuple[float, int]:
    """(experts per token the router asks for: k, or max_k for variable routers; router parameters)."""
    from moekit.routing import build_router

    r = build_router(cfg.router, dim=cfg.dim, num_experts=cfg.num_experts, **cfg.router_args)
    k = next((float(v) for v in (getattr(r, "k", None), getattr(r, "max_k", None)) if isinstance(v, int)), 1.0)
    return k, sum(p.numel() for p in r.parameters())


def count_params(cfg: LMConfig) -> ParamCount:
    """Closed-form counts from the config (only a router is built, to count its parameters)."""
    D, V, hd = cfg.dim, cfg.vocab_size, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2  # q, o + k, v
    norms = 2 * D
    dense_ffn = 3 * D * cfg.ffn_hidden
    expert = 3 * D * cfg.expert_hidden
    k, router = router_facts(cfg) if cfg.num_experts else (0.0, 0)
    total = active = 0
    experts_total = experts_active = 0
    for i in range(cfg.n_layers):
        total += attn + norms
        active += attn + norms
        if cfg.is_moe_layer(i):
            shared = 3 * D * cfg.expert_hidden * cfg.num_shared_experts + (D if cfg.shared_gate else 0)
            total += router + shared + cfg.num_experts * expert
            active += router + shared + int(k * expert)
            experts_total += cfg.num_experts * expert
            experts_active += int(k * expert)
        else:
            total += dense_ffn
            active += dense_ffn
    embedding = V * D * (1 if cfg.tie_embeddings else 2)
    total += embedding + D
    active += embedding + D
    matmul_active = active - embedding - D - cfg.n_layers * norms
    flops = 2 * matmul_active + 2 * V * D + 2 * cfg.n_layers * cfg.max_seq_len * cfg.n_heads * hd
    return ParamCount(total, active, embedding, experts_total, experts_active, flops)
