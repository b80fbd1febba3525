"""Token-choice top-k routing.

Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer" (noisy top-k gating; top-k then softmax); Lepikhin et al. 2020, "GShard" and Jiang et al.
2024, "Mixtral of Experts" (softmax then top-k, renormalised); Muennighoff et al. 2024, "OLMoE" and
Qwen-MoE (softmax then top-k, not renormalised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.routing.base import Router, check_choice, jitter, seq_len_of, top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext

ORDERS = ("softmax_topk", "topk_softmax")
NOISES = ("none", "jitter", "noisy")


@register_router("topk")
class TopKRouter(Router):
    """Each token picks its k highest-scoring experts.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token.
        order: "softmax_topk" (softmax over all E, keep the top k; Mixtral/OLMoE/Qwen) or
            "topk_softmax" (keep the top-k logits, softmax over them; Shazeer et al.).
        normalize: with "softmax_topk", rescale the k kept probabilities to sum to 1 (Mixtral: True,
            OLMoE/Qwen2-MoE: False).
        noise: "none"; "jitter" (multiply inputs by U(1-eps, 1+eps), Switch); "noisy" (add
            N(0,1) * softplus(x W_noise) to the logits, Shazeer et al.). Training only.
        noise_eps: jitter half-width.
        load_balance: coefficient of the Switch/GShard load-balance loss.
        seq_balance: coefficient of the DeepSeek sequence-wise balance loss.
        z_loss: coefficient of the ST-MoE router z-loss.
        routed_scale: multiplies the k weights (`Router.scale_weights`); with `normalize` and
            `routed_scale=k` they sum to k (1.0: off).
        selection_bias: choose experts by the scores plus DeepSeek-V3's balancing bias
            `e_score_correction_bias [E]` (added to the probabilities for "softmax_topk", to the logits for
            "topk_softmax"); the weights stay the unbiased ones. Off by default.
        bias_update_rate: with `selection_bias`, the bias's step per training call (DeepSeek-V3: 1e-3).
    """

    token_local = True

    expert_dims = {"weight": 0, "noise_weight": 0, "e_score_correction_bias": 0}  # per-expert rows (layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        order: str = "softmax_topk",
        normalize: bool = True,
        noise: str = "none",
        noise_eps: float = 1e-2,
        load_balance: float = 1e-2,
        seq_balance: float = 0.0,
        z_loss: float = 0.0,
        routed_scale: float = 1.0,
        selection_bias: bool = False,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(load_balance=load_balance, seq_balance=seq_balance, z_loss=z_loss),
            routed_scale=routed_scale, selection_bias=selection_bias, bias_update_rate=bias_update_rate,
        )
        check_choice(order, ORDERS, "order", self.who)
        check_choice(noise, NOISES, "noise", self.who)
        self.order = order
        self.normalize = normalize
        self.noise = noise
        self.noise_eps = noise_eps
        if noise == "noisy":
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        if self.training and self.noise == "jitter":
            x = jitter(x, self.noise_eps)
        logits = self.gate_logits(x)  # [T, E]
        select = logits
        if self.training and self.noise == "noisy":
            std = F.softplus(F.linear(x, self.noise_weight))
            select = logits + torch.randn_like(logits) * std
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E], for losses
        if self.order == "softmax_topk":
            sel_probs = probs if select is logits else torch.softmax(select.float(), dim=-1)
            weights, ids = top_k(sel_probs, self.k, normalize=self.normalize, select=self.biased(sel_probs))
        else:
            sel = select.float()
            top, ids = top_k(sel, self.k, normalize=False, select=self.biased(sel))  # [T, k] logits
            weights = torch.softmax(top, dim=-1)
        self.maybe_update_bias(ids)
        aux = balance_losses(
            probs, logits, ids,
            load_balance=self.load_balance,
            seq_balance=self.seq_balance,
            z=self.z_loss,
            seq_len=seq_len_of(context),
        )
        return Routing(ids, self.scale_weights(weights).to(x.dtype), logits, self.num_experts, aux=aux)
