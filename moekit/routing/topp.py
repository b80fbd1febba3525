"""Top-p (dynamic) routing: as many experts as it takes to reach a probability mass p.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models": with
P = softmax(W x) sorted in decreasing order, a token uses the smallest set of top experts whose
probabilities sum to at least p, weighted by those probabilities (not renormalised). The paper's
dynamic loss, the entropy -sum_i P_i log P_i, keeps the distribution peaked so that top-p does not
spread every token over many experts; a load-balance loss keeps the experts busy alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, seq_len_of
from moekit.routing.losses import balance_losses, entropy_loss, load_balance_loss
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("topp")
class TopPRouter(Router):
    """Each token takes its highest-probability experts until their sum reaches p.

    Args:
        dim: model width D.
        num_experts: E.
        p: probability threshold in (0, 1] (paper: 0.4).
        max_k: at most this many experts per token (None: E); also the output width.
        dynamic_loss: coefficient of the entropy (dynamic) loss (paper: 1e-4).
        load_balance: coefficient of the load-balance loss (paper: 1e-2). Its dispatch fraction f
            is normalised by the number of used slots (not T * max_k), so the loss is 1 at perfect
            balance whatever the mean number of experts per token.
        seq_balance: coefficient of the sequence-wise balance loss (f normalised by L * max_k).
        z_loss: coefficient of the ST-MoE router z-loss.

    Returns expert_ids/weights [T, max_k], used slots first, unused room -1/0.
    """

    expert_dims = {"weight": 0}  # per-expert rows (moekit.layers.surgery)

    variable_k = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        p: float = 0.4,
        max_k: int | None = None,
        dynamic_loss: float = 1e-4,
        load_balance: float = 1e-2,
        seq_balance: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, gate_outputs=num_experts,
            losses=dict(
                dynamic_loss=dynamic_loss, load_balance=load_balance, seq_balance=seq_balance, z_loss=z_loss
            ),
        )
        who = self.who
        if not (isinstance(p, int | float) and 0 < p <= 1):
            raise ValueError(f"{who}: p must be in (0, 1], got {p!r}")
        if max_k is not None and (
            not isinstance(max_k, int) or isinstance(max_k, bool) or not 1 <= max_k <= num_experts
        ):
            raise ValueError(f"{who}: max_k must be None or an integer in [1, num_experts={num_experts}], "
                             f"got {max_k!r}")
        self.p = p
        self.max_k = max_k

    @property
    def nominal_k(self) -> int:
        """The upper bound: `max_k`, else every expert."""
        return self.max_k or self.num_experts

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, max_k], logits [T, E]."""
        logits = self.gate_logits(x)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        width = self.max_k or self.num_experts
        top, ids = torch.topk(probs, width, dim=-1)  # [T, width], descending
        before = torch.cumsum(top, dim=-1) - top  # mass of the experts ranked above each slot
        # A slot is used while the mass before it is still < p: the smallest prefix reaching p.
        used = before < self.p  # [T, width]; slot 0 always used (0 < p)
        ids = torch.where(used, ids, -1)
        weights = torch.where(used, top, torch.zeros((), device=top.device))
        aux = balance_losses(
            probs, logits, ids,
            load_balance=0.0, seq_balance=self.seq_balance, z=self.z_loss, seq_len=seq_len_of(context),
        )
        if self.load_balance:
            slots = ids.numel()
            n_used = used.sum().clamp_min(1).to(probs.dtype)
            aux["load_balance"] = self.load_balance * load_balance_loss(probs, ids) * (slots / n_used)
        if self.dynamic_loss:
            aux["dynamic"] = self.dynamic_loss * entropy_loss(probs)
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux)
