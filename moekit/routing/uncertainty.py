"""Uncertainty-aware routing: Gaussian router logits whose variance tempers the mixing weights.

Zhang et al. 2024, "Efficient Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear
Modulation" (MoFME, AAAI). MoFME pairs feature-modulated experts (one shared expert, a learned
feature-wise scale and shift per expert: `moekit.layers.film.FiLMExperts`) with an
Uncertainty-aware Router (UaR) that assigns features to experts "with well-calibrated weights".

moekit's UaR models each routing logit as a Gaussian, mean mu = W_mu x and variance
sigma^2 = softplus(W_s x) (both [T, E]):
- training: experts are selected on a reparameterised sample mu + sigma * eps, so uncertain
  choices are explored;
- weights come from the calibrated probabilities softmax(mu / sqrt(1 + pi sigma^2 / 8)) (the probit
  approximation of the expected softmax under the Gaussian), so an expert the router is unsure about
  gets a damped weight; inference selects on these calibrated probabilities (deterministic);
- aux["uncertainty"] = mean 1/2 (sigma^2 - 1 - log sigma^2), the variance part of KL(N(mu, sigma^2)
  || N(mu, 1)), keeps the variance from collapsing to 0 or exploding.
This is our reading of the paper's description (calibrated weights from an uncertainty estimate); the
exact estimator of the original code may differ (docs/routing.md lists it as a deviation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.routing.base import Router, check_logits, seq_len_of, top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("uncertainty")
class UncertaintyRouter(Router):
    """Top-k over Gaussian logits N(W_mu x, softplus(W_s x)), weights tempered by the variance.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        sample: select on a reparameterised sample of the logits in training (False: on the mean).
        uncertainty: coefficient of the variance regulariser (aux["uncertainty"]).
        normalize: rescale the k kept weights to sum 1.
        load_balance: coefficient of the Switch load-balance loss (on the calibrated probabilities).

    Parameters: `weight [E, D]` (W_mu, the HF gate layout), `var_weight [E, D]` (W_s, zero-initialised:
    sigma^2 = softplus(0) = 0.69 at start). Logits are mu [T, E]; `meta["variance"]` holds sigma^2.
    """

    expert_dims = {"weight": 0, "var_weight": 0}  # mean and variance rows

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        sample: bool = True,
        uncertainty: float = 1e-3,
        normalize: bool = True,
        load_balance: float = 1e-2,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(uncertainty=uncertainty, load_balance=load_balance),
        )
        self.sample = sample
        self.normalize = normalize
        self.var_weight = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits mu [T, E]."""
        xf = self.checked_input(x, self.weight)
        mu = F.linear(xf, self.weight).float()  # [T, E]
        check_logits(mu, self.who)
        var = F.softplus(F.linear(xf, self.var_weight).float()) + 1e-6  # [T, E]
        calibrated = torch.softmax(mu / torch.sqrt(1.0 + math.pi * var / 8.0), dim=-1)  # [T, E]
        if self.training and self.sample:
            select = mu + torch.randn_like(mu) * var.sqrt()
        else:
            select = calibrated
        weights, ids = top_k(calibrated, self.k, normalize=self.normalize, select=select)  # [T, k]
        aux = balance_losses(
            calibrated, mu, ids, load_balance=self.load_balance, seq_balance=0.0, z=0.0, seq_len=seq_len_of(context),
        )
        if self.uncertainty:
            aux["uncertainty"] = self.uncertainty * 0.5 * (var - 1.0 - torch.log(var)).mean()
        return Routing(ids, weights.to(x.dtype), mu, self.num_experts, aux=aux, meta={"variance": var})
