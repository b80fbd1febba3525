"""THOR: stochastic experts, a random expert per token in training, with consistency regularisation.

Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic Experts" (THOR, ICLR). No
router is learned: in training each token is sent to an expert drawn uniformly at random. To keep
the experts interchangeable, THOR runs every batch twice with independent random expert draws and
adds a consistency regulariser to the two cross-entropies,

    L = 1/2 (CE(p1, y) + CE(p2, y)) + alpha * 1/2 (KL(p1 || p2) + KL(p2 || p1)),

where p1, p2 are the model's output distributions of the two passes (paper: alpha = 1.0 to 5.0).
At inference THOR again routes at random (any expert is a good one after training), or averages
experts.

This file holds the router and the regulariser. The regulariser needs two forward passes of the
whole model, so it is not an auxiliary loss of the routing: `thor_objective(forward, targets,
alpha)` returns L for any `forward()` that returns next-token logits (see docs/routing.md), and
moekit's trainer applies it with `TrainConfig(consistency=alpha)` (`--set consistency=1.0`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.routing.base import Router, check_choice, check_input, check_int
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext

EVAL_MODES = ("random", "average")


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Symmetric KL 1/2 (KL(p_a || p_b) + KL(p_b || p_a)) of two [..., V] logits, mean over positions."""
    la = torch.log_softmax(logits_a.float().reshape(-1, logits_a.shape[-1]), dim=-1)
    lb = torch.log_softmax(logits_b.float().reshape(-1, logits_b.shape[-1]), dim=-1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(p_a || p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    return 0.5 * (kl_ab + kl_ba)


def thor_objective(forward: Callable[[], Tensor], targets: Tensor, alpha: float = 1.0,
                   ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """THOR's loss from two stochastic passes: mean cross-entropy + alpha * consistency.

    Args:
        forward: runs the model on the batch and returns logits [..., V]; called twice (the router's
            random draws differ between the calls).
        targets: LongTensor [...] of next-token ids (ignore_index skipped).
        alpha: consistency coefficient (THOR: 1.0 to 5.0).
    Returns:
        (loss, {"ce": mean cross-entropy of the two passes, "consistency": the symmetric KL}).
    """
    a, b = forward(), forward()
    V = a.shape[-1]
    ce = 0.5 * (F.cross_entropy(a.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
                + F.cross_entropy(b.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index))
    cons = consistency_loss(a, b)
    return ce + alpha * cons, {"ce": ce.detach(), "consistency": cons.detach()}


@register_router("stochastic")
class StochasticRouter(Router):
    """THOR routing: k distinct uniformly random experts per token in training, weight 1/k; no parameters.

    Args:
        dim: model width D (only checked against the input).
        num_experts: E.
        k: experts per token in training (THOR: 1).
        eval_mode: "random": at inference a seeded random draw per token, re-created on every call
            (deterministic for a given batch); "average": every token uses all E experts with weight
            1/E (the expert-averaged prediction; E times the compute).
        seed: seed of the eval-mode generator.

    Logits are the 0/1 indicator [T, E] of the chosen experts.
    """

    expert_dims: dict = {}  # no per-expert tensors: uniform over whatever experts there are

    def __init__(self, *, dim: int, num_experts: int, k: int = 1, eval_mode: str = "random", seed: int = 0) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_choice(eval_mode, EVAL_MODES, "eval_mode", self.who)
        check_int(self.who, seed=seed)
        self.eval_mode = eval_mode
        self.seed = seed

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k] ([T, E] in "average" eval mode)."""
        check_input(x, self.dim, self.who, finite=True)
        T, E = x.shape[0], self.num_experts
        if not self.training and self.eval_mode == "average":
            ids = torch.arange(E, device=x.device).expand(T, E).contiguous()
            weights = torch.full((T, E), 1.0 / E, dtype=x.dtype, device=x.device)
            return Routing(ids, weights, torch.ones(T, E, dtype=x.dtype, device=x.device), E)
        gen = None if self.training else torch.Generator(device=x.device).manual_seed(self.seed)
        u = torch.rand(T, E, generator=gen, device=x.device)  # [T, E]
        ids = torch.topk(u, self.k, dim=-1).indices  # [T, k], a uniform random k-subset
        weights = torch.full((T, self.k), 1.0 / self.k, dtype=x.dtype, device=x.device)
        logits = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter_(1, ids, 1.0)
        return Routing(ids, weights, logits, E)
