"""Nexus routing: each expert's router row is a learned projection of its domain embedding.

Gritsch et al. 2024, "Nexus: Specialization meets Adaptability for Efficiently Training Mixture of Experts": every
expert e comes from a dense model trained on one domain and carries that domain's embedding d_e (the mean
embedding of the domain's data). The router does not learn a free row per expert; it learns one projection
P (a two-layer SwiGLU MLP, shared by the experts) and scores token x against expert e by x . P(d_e), then
softmax, top-k. Adding an expert later is adding its domain embedding: the projection is reused, so the old
experts' scores are unchanged and the new expert needs no router retraining (`moekit.convert.nexus.add_expert`).

Domain embeddings are a buffer `domain_embeddings [E, H]` (saved with the model, not trained); the projection's
parameters are `proj_gate`, `proj_up` ([P, H] linears) and `proj_out` ([D, P]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.routing.base import Router, check_logits, top_k
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import is_positive_int


@register_router("nexus")
class NexusRouter(Router):
    """Top-k over the scores x . P(d_e) of the tokens against the projected domain embeddings.

    Args:
        dim: model width D.
        num_experts: E.
        k: experts per token (Nexus: 1, next to a shared expert).
        embed_dim: width H of the domain embeddings (None: D).
        proj_hidden: width P of the projection's hidden layer (None: D).
        normalize: rescale the k kept probabilities to sum 1 (then an expert that a token does not pick leaves
            that token's weights unchanged when experts are added).
        load_balance: coefficient of the Switch load-balance loss.
        z_loss: coefficient of the ST-MoE router z-loss.
    """

    expert_dims = {"domain_embeddings": 0}  # per-expert rows (moekit.layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 1,
        embed_dim: int | None = None,
        proj_hidden: int | None = None,
        normalize: bool = True,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k, losses=dict(load_balance=load_balance, z_loss=z_loss))
        for name, v in (("embed_dim", embed_dim), ("proj_hidden", proj_hidden)):
            if v is not None and not is_positive_int(v):
                raise ValueError(f"{self.who}: {name} must be None or a positive integer, got {v!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"{self.who}: normalize must be True or False, got {normalize!r}")
        self.embed_dim = embed_dim
        self.proj_hidden = proj_hidden
        self.normalize = normalize
        H, P = embed_dim or dim, proj_hidden or dim
        self.register_buffer("domain_embeddings", torch.randn(num_experts, H))
        self.proj_gate = nn.Linear(H, P, bias=False)
        self.proj_up = nn.Linear(H, P, bias=False)
        self.proj_out = nn.Linear(P, dim, bias=False)
        for lin in (self.proj_gate, self.proj_up, self.proj_out):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))

    def expert_rows(self) -> Tensor:
        """The projected domain embeddings P(d_e): [E, D], the router's rows."""
        d = self.domain_embeddings.to(self.proj_gate.weight.dtype)
        return self.proj_out(F.silu(self.proj_gate(d)) * self.proj_up(d))

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E] = x . P(d_e)."""
        logits = F.linear(self.checked_input(x, self.proj_out.weight), self.expert_rows())  # [T, E]
        check_logits(logits, self.who)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = top_k(probs, self.k, normalize=self.normalize)
        aux = balance_losses(probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss,
                             seq_len=None)
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux)
