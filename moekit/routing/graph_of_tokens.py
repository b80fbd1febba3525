"""Similarity-aware routing: a token's routing probabilities are smoothed over similar tokens.

Nguyen et al. 2025, "Improving Routing in Sparse Mixture of Experts with Graph of Tokens". Routing
each token independently is unstable (late-training routing fluctuations); the paper builds a graph
over the tokens of a sequence and lets similar tokens share routing decisions. Its Similarity-Aware
MoE (S-MoE) uses the router's own scores as token features:

    z = W x [T, E],   A_ij = softmax_j( z_i . z_j / (tau sqrt(E)) ),   P~ = A softmax(z),
    ids = top-k(P~),  weights = P~_ids (renormalised).

moekit builds the graph within each sequence (`RoutingContext.seq_len`, set by the MoE layer for [B, L, D]
input; a [T, D] input without it is one sequence) and, for causal language models, only over
earlier tokens (`causal=True`), so routing never reads the future. Cost O(L^2 E) per sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.base import Router, check_positive, seq_len_of, top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


def token_graph(z: Tensor, seq_len: int, temperature: float, causal: bool) -> Tensor:
    """Row-stochastic similarity graph within each sequence.

    z: [T, E] token features (T a multiple of seq_len) -> A [B, L, L] with A[b, i, j] =
    softmax_j(z_i . z_j / (temperature * sqrt(E))), j restricted to j <= i when causal.
    """
    T, E = z.shape
    B = T // seq_len
    zs = z.reshape(B, seq_len, E)
    sim = torch.bmm(zs, zs.transpose(1, 2)) / (temperature * math.sqrt(E))  # [B, L, L]
    if causal:
        future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=z.device).triu(1)
        sim = sim.masked_fill(future, float("-inf"))
    return torch.softmax(sim, dim=-1)


@register_router("graph_of_tokens")
class GraphOfTokensRouter(Router):
    """Top-k of P~ = A softmax(W x), A the token-similarity graph of each sequence.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        temperature: tau of the graph softmax (smaller: each token listens mostly to itself and its
            nearest neighbours; larger: towards the sequence mean).
        causal: only earlier tokens (and the token itself) are neighbours (needed for causal LMs).
        normalize: rescale the k kept probabilities to sum 1.
        load_balance: coefficient of the load-balance loss (on the smoothed P~).
        z_loss: coefficient of the ST-MoE z-loss on the raw logits.

    Logits are the raw scores W x [T, E]; `meta["smoothed"]` holds P~ [T, E].
    """

    needs_full_sequence = True  # the token graph spans each sequence of `context.seq_len` rows
    expert_dims = {"weight": 0}  # per-expert rows (moekit.layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        temperature: float = 1.0,
        causal: bool = True,
        normalize: bool = True,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(load_balance=load_balance, z_loss=z_loss),
        )
        check_positive(self.who, temperature=temperature)
        self.temperature = temperature
        self.causal = causal
        self.normalize = normalize

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        logits = self.gate_logits(x).float()  # [T, E]
        T = logits.shape[0]
        L = seq_len_of(context) or T
        if T % L:
            raise ValueError(f"{self.who}: T={T} tokens is not a multiple of context.seq_len={L}")
        A = token_graph(logits, L, self.temperature, self.causal)  # [B, L, L]
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        smoothed = torch.bmm(A, probs.reshape(T // L, L, -1)).reshape(T, -1)  # [B, L, L] x [B, L, E] -> [T, E]
        weights, ids = top_k(smoothed, self.k, normalize=self.normalize)  # [T, k]
        aux = balance_losses(
            smoothed, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss, seq_len=L,
        )
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, meta={"smoothed": smoothed})
