"""Mixture of Routers: several sub-routers make their own choices; a main router weighs them.

Zhang et al. 2025, "Mixture of Routers" (MoR). A single router can mis-assign tokens; MoR runs R
sub-routers, each a linear gate that proposes its own top-k experts, and a learned main router that
decides how much each sub-router counts for this token. The experts' final scores are the
main-router-weighted sum of the sub-routers' (sparse) proposals, and the token takes the top-k of
those joint scores:

    P_r = softmax(W_r x) [E],   S_r = P_r masked to its top-k_r,   a = softmax(W_main x) [R],
    score = sum_r a_r S_r,      ids = top-k(score),   weights = score_ids / sum score_ids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, check_k, check_logits, renormalize, seq_len_of
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import check_positive_ints


@register_router("mixture_of_routers")
class MixtureOfRoutersRouter(Router):
    """Top-k of sum_r a_r(x) topk_mask(softmax(W_r x)), a = softmax(W_main x).

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        num_routers: R sub-routers (>= 1).
        router_k: experts each sub-router proposes (None: k; num_experts: dense sub-router scores).
        load_balance: coefficient of the load-balance loss, on the dense mixture sum_r a_r P_r.
        z_loss: coefficient of the ST-MoE z-loss over every sub-router's logits.

    Parameters: `sub_weight [R, E, D]` (the sub-routers' gates), `main_weight [R, D]` (the main
    router). Logits are log(sum_r a_r P_r) [T, E], the dense joint scores. `meta["router_weights"]`
    holds a [T, R].
    """

    expert_dims = {"sub_weight": 1}  # [R, E, D]: every sub-router's rows

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        num_routers: int = 4,
        router_k: int | None = None,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k, losses=dict(load_balance=load_balance, z_loss=z_loss))
        who = self.who
        check_positive_ints(f"{who}: ", num_routers=num_routers)
        if router_k is not None:
            check_k(router_k, num_experts, f"{who} (router_k)")
        self.num_routers = num_routers
        self.router_k = router_k
        self.sub_weight = nn.Parameter(torch.empty(num_routers, num_experts, dim))
        self.main_weight = nn.Parameter(torch.empty(num_routers, dim))
        nn.init.normal_(self.sub_weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.main_weight, std=1.0 / math.sqrt(dim))

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        who = self.who
        xf = self.checked_input(x, self.sub_weight)
        sub_logits = torch.einsum("td,red->tre", xf, self.sub_weight).float()  # [T, R, E]
        check_logits(sub_logits, who)
        main = torch.softmax(torch.nn.functional.linear(xf, self.main_weight).float(), dim=-1)  # [T, R]
        sub_probs = torch.softmax(sub_logits, dim=-1)  # [T, R, E]
        rk = self.router_k or self.k
        if rk < self.num_experts:
            keep = torch.zeros_like(sub_probs, dtype=torch.bool)
            keep.scatter_(-1, sub_probs.topk(rk, dim=-1).indices, True)  # each sub-router's proposal
            proposals = sub_probs * keep
        else:
            proposals = sub_probs
        score = (main.unsqueeze(-1) * proposals).sum(dim=1)  # [T, R, 1] * [T, R, E] -> [T, E]
        dense = (main.unsqueeze(-1) * sub_probs).sum(dim=1)  # [T, E], rows sum to 1
        # A token whose proposals cover fewer than k experts fills the rest from the dense scores.
        ids = torch.topk(score + 1e-9 * dense, self.k, dim=-1).indices  # [T, k]
        weights = renormalize(score.gather(1, ids))  # [T, k]
        logits = torch.log(dense.clamp_min(1e-20))  # [T, E]
        aux = balance_losses(
            dense, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=0.0,
            seq_len=seq_len_of(context),
        )
        if self.z_loss:
            aux["z_loss"] = self.z_loss * torch.logsumexp(sub_logits, dim=-1).square().mean()
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, meta={"router_weights": main})
