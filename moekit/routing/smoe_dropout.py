"""SMoE-Dropout: a frozen random router whose number of active experts grows during training.

Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers"
(ICLR). The router is a randomly initialised linear gate that is never trained (avoiding the
representation collapse of learned routers), G(x) = top-k(softmax(W x)). During training k grows
linearly from a small k_start to k_end (all experts), so early training is a strong "dropout" over
experts and late training uses (nearly) the full dense network. At inference any k may be chosen
("self-slimmable"): fewer experts for speed, more for quality.

The gate `weight [E, D]` is a buffer (saved in checkpoints, never updated), drawn from a generator
seeded with `seed`, so equal configs give equal routers. Training progress is counted in calls made
in training mode (`steps_seen`, a buffer, so it resumes with the checkpoint): one call per optimiser
step per layer without gradient accumulation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.base import Router, check_int, check_k, check_logits, top_k
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import check_positive_ints


@register_router("smoe_dropout")
class SMoEDropoutRouter(Router):
    """Top-k of softmax(W x) with a frozen random W and k annealed from k_start to k_end.

    Args:
        dim: model width D.
        num_experts: E.
        k_start: experts per token at the start of training (paper: 1 or 2).
        k_end: experts per token at the end of the annealing (None: E, the paper's default).
        anneal_steps: training calls over which k grows linearly from k_start to k_end.
        eval_k: experts per token at inference (None: k_end); change it any time (`router.eval_k = 1`).
        normalize: rescale the k kept probabilities to sum 1.
        seed: seed of the frozen random gate.

    The output width is the current k (so compute grows with it).
    """

    expert_dims = {"weight": 0}  # the frozen gate's rows (moekit.layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k_start: int = 1,
        k_end: int | None = None,
        anneal_steps: int = 1000,
        eval_k: int | None = None,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts)
        who = self.who
        check_k(k_start, num_experts, who)
        for name, v in (("k_end", k_end), ("eval_k", eval_k)):
            if v is not None:
                check_k(v, num_experts, f"{who} ({name})")
        if (k_end or num_experts) < k_start:
            raise ValueError(f"{who}: k_end={k_end} must be >= k_start={k_start}")
        check_positive_ints(f"{who}: ", anneal_steps=anneal_steps)
        check_int(who, seed=seed)
        self.k_start = k_start
        self.k_end = k_end
        self.anneal_steps = anneal_steps
        self.eval_k = eval_k
        self.normalize = normalize
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(num_experts, dim, generator=gen) / math.sqrt(dim))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    @property
    def nominal_k(self) -> int:
        """k at inference: eval_k, else k_end (every expert by default)."""
        return self.eval_k or self.k_end or self.num_experts

    def current_k(self) -> int:
        """k of the next call: annealed in training, eval_k (or k_end) at inference."""
        k_end = self.k_end or self.num_experts
        if not self.training:
            return self.eval_k or k_end
        frac = min(int(self.steps_seen) / self.anneal_steps, 1.0)
        return self.k_start + math.floor((k_end - self.k_start) * frac + 1e-9)

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, current k], logits [T, E]."""
        xw = self.checked_input(x, self.weight)
        k = self.current_k()
        logits = torch.nn.functional.linear(xw, self.weight)  # [T, E], frozen
        check_logits(logits, self.who)
        weights, ids = top_k(torch.softmax(logits.float(), dim=-1), k, normalize=self.normalize)  # [T, k]
        if self.training:
            self.steps_seen += 1
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts)
