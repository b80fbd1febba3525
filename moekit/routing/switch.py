"""Switch routing: top-1 token choice with a capacity limit.

Fedus, Zoph and Shazeer 2021, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
and Efficient Sparsity": each token goes to the expert of highest router probability p_i(x) =
softmax(W x)_i, the expert output is scaled by that probability (not renormalised), every expert keeps
at most C = ceil(capacity_factor * T * k / E) tokens (the rest are dropped and pass through the
residual connection), the router input may be jittered in training, and the load-balance loss
alpha * E * sum_i f_i P_i (eq. 4) keeps the experts busy alike. The router z-loss is from ST-MoE
(Zoph et al. 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, jitter, seq_len_of, top_k
from moekit.routing.capacity import apply_capacity
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("switch")
class SwitchRouter(Router):
    """Top-1 (or top-k) routing with the softmax probability as weight and a capacity limit.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token (Switch: 1).
        capacity_factor: each expert keeps at most ceil(capacity_factor * T * k / E) token-slots,
            filled in token order (first choices before second choices); overflow slots become -1
            with weight 0 and are counted in `Routing.dropped`. None: no limit (dropless).
        jitter_eps: in training, multiply the router input by U(1 - eps, 1 + eps); 0 disables.
        load_balance: coefficient alpha of the load-balance loss (paper: 1e-2); computed on the
            choices before capacity, as in the paper.
        z_loss: coefficient of the ST-MoE router z-loss.
        routed_scale: multiplies the weights (`Router.scale_weights`; 1.0: off).
        selection_bias: choose experts by p + DeepSeek-V3's balancing bias `e_score_correction_bias [E]`,
            weighting them by p; off by default.
        bias_update_rate: with `selection_bias`, the bias's step per training call (DeepSeek-V3: 1e-3).
    """

    expert_dims = {"weight": 0, "e_score_correction_bias": 0}  # per-expert rows (moekit.layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        jitter_eps: float = 1e-2,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
        routed_scale: float = 1.0,
        selection_bias: bool = False,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(load_balance=load_balance, z_loss=z_loss),
            routed_scale=routed_scale, selection_bias=selection_bias, bias_update_rate=bias_update_rate,
        )
        who = self.who
        if capacity_factor is not None and not (
            isinstance(capacity_factor, int | float) and capacity_factor > 0
        ):
            raise ValueError(f"{who}: capacity_factor must be > 0 or None, got {capacity_factor!r}")
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"{who}: jitter_eps must be in [0, 1), got {jitter_eps!r}")
        self.capacity_factor = capacity_factor
        self.jitter_eps = jitter_eps

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E], `dropped` the number
        of token-slots over capacity."""
        if self.training and self.jitter_eps > 0:
            x = jitter(x, self.jitter_eps)
        logits = self.gate_logits(x)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = top_k(probs, self.k, normalize=False, select=self.biased(probs))  # [T, k], weight = p_i(x)
        self.maybe_update_bias(ids)  # the choices before capacity
        aux = balance_losses(
            probs, logits, ids,
            load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss, seq_len=seq_len_of(context),
        )
        routing = Routing(ids, self.scale_weights(weights).to(x.dtype), logits, self.num_experts, aux=aux)
        if self.capacity_factor is None:
            return routing
        return apply_capacity(routing, self.capacity_factor, "order")
