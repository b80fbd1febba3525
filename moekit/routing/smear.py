"""SMEAR routing: one distribution over experts per example, from the example's mean representation.

Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing" (SMEAR, TMLR 2024). The router
reads the average of an example's token representations and outputs p = softmax(W mean(x)) over all
E experts; `moekit.layers.smear.SmearExperts` then merges the experts' parameters with p into one
expert (with ordinary `Experts` the same routing is a dense mixture of expert outputs, E times the
compute).

A causal language model must not route a token on later tokens, so by default (`causal=True`) the
"example" of token t is its prefix: p_t = softmax(W mean(x_1..x_t)) within its sequence. With
`causal=False` (encoders, classification: the paper's setting) every token of a sequence gets the
sequence's p, also returned as `meta["example_weights"] [B, E]` so that `SmearExperts` merges once per
example. Sequences come from `RoutingContext.seq_len` (set by the MoE layer for [B, L, D] input); without
it the T tokens are one sequence. Under KV-cached generation a call sees only its own tokens, so the
causal prefix mean covers only the tokens of that call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, check_input, seq_len_of
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("smear")
class SmearRouter(Router):
    """Dense routing over all E experts from the (prefix or whole-sequence) mean of the tokens.

    Args:
        dim: model width D.
        num_experts: E.
        causal: pool each token's prefix (True, for causal LMs) or the whole sequence (False).

    Returns expert_ids [T, E] (every expert, in order) and weights p [T, E]; logits W mean(x) [T, E].
    """

    needs_full_sequence = True  # pools each sequence (prefix) of `context.seq_len` rows
    expert_dims = {"weight": 0}  # per-expert rows (moekit.layers.surgery)

    def __init__(self, *, dim: int, num_experts: int, causal: bool = True) -> None:
        super().__init__(dim=dim, num_experts=num_experts, gate_outputs=num_experts)
        self.causal = causal

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, E], logits [T, E]."""
        check_input(x, self.dim, self.who)
        T, D = x.shape
        L = seq_len_of(context) or T
        if T % L:
            raise ValueError(f"{self.who}: T={T} tokens is not a multiple of context.seq_len={L}")
        xs = x.reshape(T // L, L, D).float()  # [B, L, D]
        if self.causal:
            count = torch.arange(1, L + 1, device=x.device, dtype=xs.dtype).view(1, L, 1)
            pooled = (xs.cumsum(dim=1) / count).reshape(T, D)  # prefix means
        else:
            pooled = xs.mean(dim=1, keepdim=True).expand(-1, L, -1).reshape(T, D)
        logits = self.gate_logits(pooled.to(x.dtype))  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        ids = torch.arange(self.num_experts, device=x.device).expand(T, -1).contiguous()
        meta = {} if self.causal else {"example_weights": probs.reshape(T // L, L, -1)[:, 0].to(x.dtype)}
        return Routing(ids, probs.to(x.dtype), logits, self.num_experts, meta=meta)
