"""Attention router: expert scores from a small attention among the experts' own projections.

Wu et al. 2024, "Yuan 2.0-M32: Mixture of Experts with Attention Router" (IEIT Systems). A classical
router scores each expert independently (p = softmax(W x)). The attention router projects the token
into three E-vectors, q = W_q x, k = W_k x, v = W_v x (one scalar per expert each), treats the E
experts as a length-E sequence of 1-d elements and attends among them:

    A = softmax(q k^T) [E, E],  s = A v [E],  p = softmax(s),  ids = top-k(p)

so an expert's score depends on how it relates to every other expert (the paper's motivation: the
correlation between experts is taken into account when picking the k experts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, check_logits, seq_len_of, softmax_top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("attention")
class AttentionRouter(Router):
    """Top-k over scores s = softmax(q k^T) v, with q, k, v [E] linear projections of the token.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token (Yuan 2.0-M32: 2 of 32).
        normalize: rescale the k kept probabilities to sum 1.
        load_balance: coefficient of the Switch/GShard load-balance loss.
        z_loss: coefficient of the ST-MoE router z-loss on the scores s.

    Parameters: `query_key_value.weight [3E, D]` (q rows, then k rows, then v rows). Returns logits
    = the scores s [T, E] (float32).
    """

    expert_dims = {"query_key_value.weight": (0, 3)}  # q, k, v blocks of E rows each

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k, losses=dict(load_balance=load_balance, z_loss=z_loss))
        self.normalize = normalize
        self.query_key_value = nn.Linear(dim, 3 * num_experts, bias=False)
        nn.init.normal_(self.query_key_value.weight, std=1.0 / math.sqrt(dim))

    def scores(self, x: Tensor) -> Tensor:
        """x: [T, D] -> s [T, E] = softmax(q k^T) v per token (float32)."""
        qkv = self.query_key_value(self.checked_input(x, self.query_key_value.weight)).float()  # [T, 3E]
        q, k, v = qkv.chunk(3, dim=-1)  # [T, E] each
        attn = torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2), dim=-1)  # [T, E, 1] x [T, 1, E] -> [T, E, E]
        s = torch.bmm(attn, v.unsqueeze(-1)).squeeze(-1)  # [T, E, E] x [T, E, 1] -> [T, E]
        check_logits(s, self.who)
        return s

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        logits = self.scores(x)  # [T, E]
        probs, weights, ids = softmax_top_k(logits, self.k, normalize=self.normalize)  # [T, E], [T, k], [T, k]
        aux = balance_losses(
            probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss,
            seq_len=seq_len_of(context),
        )
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux)
