"""Random routing: k distinct experts drawn uniformly for each token.

A baseline with no learned router, as the random-routing controls of Roller et al. 2021, "Hash
Layers For Large Sparse Models" and Zuo et al. 2022, "Taming Sparsely Activated Transformer with
Stochastic Experts" (THOR). In training each call draws fresh experts from the global RNG; in eval
mode the draw uses a torch.Generator seeded with `seed`, re-created on every call, so the same input
always gets the same experts (the choice depends on the token's position in the batch, not its
content).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, check_input, check_int
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


@register_router("random")
class RandomRouter(Router):
    """k distinct experts uniformly at random per token, weights 1/k; no parameters.

    Args:
        dim: model width D (only checked against the input).
        num_experts: E.
        k: experts per token.
        seed: seed of the eval-mode generator.

    Logits are the 0/1 indicator [T, E] of the chosen experts.
    """

    expert_dims: dict = {}  # no per-expert tensors: uniform over whatever experts there are

    def __init__(self, *, dim: int, num_experts: int, k: int = 2, seed: int = 0) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_int(self.who, seed=seed)
        self.seed = seed

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        check_input(x, self.dim, self.who, finite=True)
        T, E = x.shape[0], self.num_experts
        gen = None
        if not self.training:
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
        u = torch.rand(T, E, generator=gen, device=x.device)  # [T, E]
        ids = torch.topk(u, self.k, dim=-1).indices  # [T, k]: a uniform random k-subset
        weights = torch.full((T, self.k), 1.0 / self.k, dtype=x.dtype, device=x.device)
        logits = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter_(1, ids, 1.0)
        return Routing(ids, weights, logits, E)
