"""Layerwise recurrent routing: a GRU carries routing information from each MoE layer to the next.

Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts" (RMoE). Each layer i projects its
token to a small width, x'_i = W_proj,i x_i, updates a GRU state with it, h_i = GRU(x'_i, h_{i-1}),
and scores the experts from the state, logits_i = W_gate,i h_i; then ordinary top-k. The first MoE
layer starts from h_0 = 0. Routing decisions of earlier layers thereby inform later ones, and the
router gets gradient from every later layer through h.

In moekit the state travels in the contract: this router returns `Routing.state = h_i [T, H]` and
reads `RoutingContext.previous.state` (`MoELM` passes the previous MoE layer's `Routing`). Each layer
owns its projection, GRU cell and gate (the paper's per-layer projector and gate; its GRU cell is
per layer here as well, since moekit's routers are independent modules).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, check_logits, seq_len_of, softmax_top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import is_positive_int


@register_router("recurrent")
class RecurrentRouter(Router):
    """Top-k over W_gate h, h = GRU(W_proj x, h_prev), h_prev the previous layer's `Routing.state` (zeros when absent).

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        hidden: GRU width H (None: min(D, 128); RMoE uses a small width, 128).
        normalize: rescale the k kept probabilities to sum 1.
        detach_state: stop gradients flowing into earlier layers' routers through h (RMoE's ablation).
        load_balance: coefficient of the Switch/GShard load-balance loss.
        z_loss: coefficient of the ST-MoE router z-loss.

    Parameters: `proj [H, D]` (Linear), `gru` (nn.GRUCell(H, H)), `weight [E, H]` (the gate).
    Returns `Routing.state = h [T, H]` for the next MoE layer.
    """

    needs_previous = True  # h_prev: the previous MoE layer's `Routing.state` of the same tokens
    expert_dims = {"weight": 0}  # the gate's per-expert output rows (the GRU is shared)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        hidden: int | None = None,
        normalize: bool = True,
        detach_state: bool = False,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k, losses=dict(load_balance=load_balance, z_loss=z_loss))
        if hidden is not None and not is_positive_int(hidden):
            raise ValueError(f"{self.who}: hidden must be None or a positive integer, got {hidden!r}")
        self.hidden = hidden
        self.normalize = normalize
        self.detach_state = detach_state
        H = self.width
        self.proj = nn.Linear(dim, H, bias=False)
        self.gru = nn.GRUCell(H, H)
        self.weight = nn.Parameter(torch.empty(num_experts, H))
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(H))

    @property
    def width(self) -> int:
        """H, the GRU state width."""
        return self.hidden if self.hidden is not None else min(self.dim, 128)

    def previous(self, context: RoutingContext | None, x: Tensor) -> Tensor:
        """h_prev [T, H], the state the previous MoE layer's router handed on (`context.previous.state`),
        or zeros when there is none (the first MoE layer)."""
        prev = context.previous_state if context is not None else None
        T, H = x.shape[0], self.width
        if prev is None:
            return x.new_zeros(T, H, dtype=self.weight.dtype)
        if not isinstance(prev, Tensor) or prev.shape != (T, H):
            got = tuple(prev.shape) if isinstance(prev, Tensor) else type(prev).__name__
            raise ValueError(
                f"{self.who}: context.previous.state must be the previous recurrent router's state [T, H] = "
                f"[{T}, {H}], got {got}; every MoE layer of a model must use the same recurrent router width"
            )
        return prev.detach() if self.detach_state else prev

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E], state h [T, H]."""
        xw = self.checked_input(x, self.weight)
        h_prev = self.previous(context, x)
        h = self.gru(self.proj(xw), h_prev)  # [T, H]
        logits = torch.nn.functional.linear(h, self.weight)  # [T, E]
        check_logits(logits, self.who)
        probs, weights, ids = softmax_top_k(logits, self.k, normalize=self.normalize)  # [T, E], [T, k], [T, k]
        aux = balance_losses(
            probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss,
            seq_len=seq_len_of(context),
        )
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, state=h)
