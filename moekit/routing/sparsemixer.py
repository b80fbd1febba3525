"""SparseMixer routing: experts picked one at a time, each over the scores near the best remaining one.

Liu et al. 2023, "Sparse Backpropagation for MoE Training" (SparseMixer: a sampled expert choice with a
midpoint-method gradient estimate) and Liu et al. 2024, "GRIN: GRadient-INformed MoE" (arXiv 2409.12136;
the top-2 form PhiMoE / Phi-3.5-MoE uses). For slot i = 1..k, with s the gate logits [T, E] and the
experts chosen for earlier slots set to -inf (s^(i)):

    m = max_e s^(i)_e;  keep e where (m - s_e) / max(|s_e|, m) <= 2 eps   (the jitter threshold)
    g^(i) = softmax over the kept scores of s^(i);  expert_i = argmax g^(i)   (eval)
    weight_i = g^(i)[expert_i]

In training, expert_i is sampled from g^(i) (Gumbel-max), and the weight's gradient reaches the logits
through GRIN's estimator: d weight_i / d s = weight_i * (onehot(expert_i) - g^(i)), the forward weight
scaled by 1 when the sampled expert is the argmax (or with probability 1/4) and by 1/3 otherwise
(Heun's third-order midpoint). The weights are not renormalised and stay in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, check_positive, seq_len_of
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


class _GrinGradient(torch.autograd.Function):
    """forward: weight * scale; backward: the gradient reaches the logits only, as
    g * weight * (onehot(expert) - gates) (GRIN's estimator of the sampled choice's gradient)."""

    @staticmethod
    def forward(ctx, logits: Tensor, weight: Tensor, expert: Tensor, gates: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight, expert, gates)
        return weight * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, expert, gates = ctx.saved_tensors
        g = grad * weight  # [T, 1]
        d_logits = (gates * g).neg().scatter_add(-1, expert, g)  # [T, E]
        return d_logits, None, None, None, None


def sparsemixer_step(
    logits: Tensor, masked: Tensor, eps: float, training: bool, first: bool
) -> tuple[Tensor, Tensor]:
    """One slot of SparseMixer: logits s [T, E], `masked` = s with earlier choices at -inf ->
    (weight [T, 1], expert id [T, 1]). `first`: the first slot (random numbers are drawn as
    transformers' PhiMoE draws them, so seeded training steps match it)."""
    with torch.no_grad():
        best, best_id = masked.max(dim=-1, keepdim=True)  # [T, 1]
        far = ((best - logits) / logits.abs().clamp(min=best)) > 2 * eps  # [T, E], outside the threshold
    gated = masked.masked_fill(far, float("-inf"))
    if training:  # Gumbel-max sample from softmax(gated)
        noise = torch.empty_like(gated).exponential_().log()
        expert = (gated - noise).max(dim=-1)[1].unsqueeze(-1)
    else:
        expert = best_id
    gates = torch.softmax(gated, dim=-1)  # [T, E]
    weight = gates.gather(-1, expert)  # [T, 1]
    if training:
        top = gates.max(dim=-1, keepdim=True)
        draw = torch.rand_like(top.values)
        if not first:
            draw.uniform_()  # PhiMoE draws this slot's uniform twice
        midpoint = (expert == top.indices) | (draw > 0.75)
        scale = torch.add(0.3333, midpoint, alpha=0.6667).type_as(gates)  # 1 or 1/3
        weight = _GrinGradient.apply(logits, weight, expert, gates, scale)
    return weight, expert


@register_router("sparsemixer")
class SparseMixerRouter(Router):
    """SparseMixer / GRIN routing (PhiMoE): k experts chosen one after another, each from the scores
    within a relative threshold 2 eps of the best remaining one; weights not renormalised.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token (PhiMoE: 2).
        jitter_eps: eps of the threshold (PhiMoE's `router_jitter_noise`, 0.01): a score s_e takes part
            in a slot when (m - s_e) / max(|s_e|, m) <= 2 eps, m the best remaining score.
        load_balance: coefficient of the Switch/GShard load-balance loss (over softmax(logits)).
        z_loss: coefficient of the ST-MoE router z-loss.

    In training the experts are sampled (Gumbel-max over each slot's thresholded softmax) and the
    weights' gradient is GRIN's estimator (module docstring).
    """

    expert_dims = {"weight": 0}  # per-expert rows (layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        jitter_eps: float = 0.01,
        load_balance: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(load_balance=load_balance, z_loss=z_loss),
        )
        check_positive(self.who, jitter_eps=jitter_eps)
        self.jitter_eps = jitter_eps

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k] (weights in the logits' dtype), logits [T, E]."""
        logits = self.gate_logits(x)  # [T, E]
        masked = logits
        weights, ids = [], []
        for i in range(self.k):
            if i:
                masked = masked.scatter(-1, ids[-1], float("-inf"))
            w, e = sparsemixer_step(logits, masked, self.jitter_eps, self.training, first=i == 0)
            weights.append(w)
            ids.append(e)
        expert_ids, w = torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)  # [T, k]
        aux: dict[str, Tensor] = {}
        if self.load_balance or self.z_loss:
            probs = torch.softmax(logits.float(), dim=-1)
            aux = balance_losses(probs, logits, expert_ids, load_balance=self.load_balance, seq_balance=0.0,
                                 z=self.z_loss, seq_len=seq_len_of(context))
        return Routing(expert_ids, w.to(x.dtype), logits, self.num_experts, aux=aux)
