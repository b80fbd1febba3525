"""Expert-choice routing: experts pick their tokens.

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing": token-to-expert scores
S = softmax(X W^T) over experts [T, E]; each expert takes its C highest-scoring tokens,
C = ceil(capacity_factor * T * k / E) (the paper's capacity factor c, the mean number of experts per
token, is capacity_factor * k here); the gating weight of a (token, expert) pair is its score S.
Experts are balanced by construction (every expert takes exactly C tokens when C <= T), so no
load-balance loss is needed; a token may get anything from 0 to E experts.

Caveats: a token's experts depend on the other tokens in the batch (and on future tokens in a
sequence), so expert choice is not causal for autoregressive decoding (see capacity.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, check_positive
from moekit.routing.capacity import expert_capacity
from moekit.routing.losses import z_loss as z_loss_fn
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert chooses its top-C tokens; expressed per token as [T, kmax] slots.

    Args:
        dim: model width D.
        num_experts: E.
        k: mean number of experts per token that sets the capacity (with capacity_factor).
        capacity_factor: C = ceil(capacity_factor * T * k / E), capped at T.
        z_loss: coefficient of the ST-MoE router z-loss.

    The returned `Routing` has width kmax = the most experts any token got in this batch (slots
    sorted by weight, padded with -1/0). `dropped` counts the TOKENS that no expert chose (they get
    a zero expert output), not token-slots. `meta["capacity"]` is C as a LongTensor scalar.
    """

    expert_dims = {"weight": 0}  # per-expert rows (moekit.layers.surgery)

    variable_k = True

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float = 1.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts, losses=dict(z_loss=z_loss)
        )
        check_positive(self.who, capacity_factor=capacity_factor)
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, kmax], logits [T, E]."""
        logits = self.gate_logits(x)  # [T, E]
        T, E = logits.shape
        scores = torch.softmax(logits.float(), dim=-1)  # S [T, E]
        C = min(expert_capacity(self.capacity_factor, T, self.k, E), T)
        _, tok = torch.topk(scores.t(), C, dim=-1)  # [E, C]: each expert's chosen tokens
        chosen = torch.zeros(E, T, dtype=torch.bool, device=x.device)
        chosen.scatter_(1, tok, True)
        chosen = chosen.t()  # [T, E]
        per_token = chosen.sum(dim=1)  # [T]
        kmax = max(int(per_token.max()) if T else 0, 1)
        # Chosen pairs keep their score (>= 0), the rest sort last at -1.
        key = torch.where(chosen, scores, torch.full_like(scores, -1.0))  # [T, E]
        _, ids = torch.topk(key, kmax, dim=-1)  # [T, kmax], highest weight first
        filled = torch.gather(chosen, 1, ids)  # [T, kmax]
        weights = torch.where(filled, torch.gather(scores, 1, ids), torch.zeros((), device=x.device))
        ids = torch.where(filled, ids, -1)
        aux = {"z_loss": self.z_loss * z_loss_fn(logits)} if self.z_loss else {}
        return Routing(
            ids, weights.to(x.dtype), logits, E, aux=aux,
            dropped=(per_token == 0).sum(),
            meta={"capacity": torch.tensor(C, device=x.device)},
        )
