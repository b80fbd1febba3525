"""MoEC: Mixture of Expert Clusters — variance-based routing constraints and cluster-level expert dropout.

Xie et al. 2023, "MoEC: Mixture of Expert Clusters" (AAAI). Sparse MoE with many experts overfits
because each expert sees few tokens. MoEC groups the E experts into clusters of `cluster_size`
consecutive experts and

1. adds a variance-based constraint to the routing: for every token, the variance of the routing
   probabilities within each cluster is penalised, so experts of one cluster receive similar
   probabilities (similar tokens, hence similar functions); and
2. applies cluster-level expert dropout in training: each (token, expert) is dropped with
   probability `expert_dropout`; a token whose chosen expert is dropped is re-routed to the best
   surviving expert of the same cluster, so the cluster, not one expert, learns the token and the
   experts' data is enlarged.

The base routing is top-k of softmax(W x) (the paper builds on top-1 Switch routing) with the
Switch load-balance loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, renormalize, seq_len_of
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext


def cluster_variance_loss(probs: Tensor, cluster_size: int) -> Tensor:
    """Mean over tokens and clusters of the variance of the routing probabilities within a cluster.

    probs: [T, E] with E a multiple of cluster_size; returns a scalar (0 when every cluster's
    experts get equal probabilities). Multiplied by E^2, so its size does not shrink as the
    probabilities do when E grows.
    """
    T, E = probs.shape
    grouped = probs.reshape(T, E // cluster_size, cluster_size)  # [T, C, S]
    return grouped.var(dim=-1, unbiased=False).mean() * E * E


@register_router("moec")
class MoECRouter(Router):
    """Top-k routing with intra-cluster variance loss and cluster-level expert dropout (training).

    Args:
        dim: model width D.
        num_experts: E, a multiple of cluster_size.
        k: experts per token (paper: 1).
        cluster_size: experts per cluster (consecutive ids; paper: 2 to 4 experts per cluster).
        expert_dropout: probability of dropping a (token, expert) pair in training (paper: ~0.1-0.5).
        variance_loss: coefficient of `cluster_variance_loss` (returned as aux["cluster_variance"]).
        normalize: rescale the k kept probabilities to sum 1.
        load_balance: coefficient of the Switch load-balance loss.
        z_loss: coefficient of the ST-MoE z-loss.

    A slot whose expert is dropped takes the best surviving, not yet chosen expert of its cluster
    (weight = that expert's probability); if the whole cluster is dropped for that token, the slot
    becomes empty (-1, weight 0). `meta["rerouted"] [T, k]` marks re-routed slots.
    """

    expert_dims = {"weight": 0}  # per-expert rows (moekit.layers.surgery)

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 1,
        cluster_size: int = 2,
        expert_dropout: float = 0.1,
        variance_loss: float = 1e-2,
        normalize: bool = True,
        load_balance: float = 1e-2,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(variance_loss=variance_loss, load_balance=load_balance, z_loss=z_loss),
        )
        who = self.who
        if not isinstance(cluster_size, int) or cluster_size < 1 or num_experts % cluster_size:
            raise ValueError(
                f"{who}: cluster_size must be a positive integer dividing num_experts={num_experts}, "
                f"got {cluster_size!r}"
            )
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"{who}: expert_dropout must be in [0, 1), got {expert_dropout!r}")
        self.cluster_size = cluster_size
        self.expert_dropout = expert_dropout
        self.normalize = normalize

    def reroute(self, probs: Tensor, ids: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
        """Replace slots whose expert is dropped by the best surviving free expert of the same cluster.

        probs [T, E], ids [T, k], dropped bool [T, E] -> (new ids [T, k] with -1 where the cluster is
        exhausted, rerouted bool [T, k]).
        """
        T, E = probs.shape
        S = self.cluster_size
        cluster_of = torch.arange(E, device=probs.device) // S  # [E]
        taken = torch.zeros(T, E, dtype=torch.bool, device=probs.device)
        out = ids.clone()
        rerouted = torch.zeros_like(ids, dtype=torch.bool)
        for j in range(ids.shape[1]):
            e = ids[:, j]  # [T]
            bad = dropped.gather(1, e[:, None]).squeeze(1) | taken.gather(1, e[:, None]).squeeze(1)  # [T]
            same = cluster_of[None, :] == cluster_of[e][:, None]  # [T, E]
            ok = same & ~dropped & ~taken
            cand = probs.masked_fill(~ok, -1.0)
            best_p, best = cand.max(dim=1)  # [T]
            new = torch.where(bad, torch.where(best_p >= 0, best, -1), e)
            out[:, j] = new
            rerouted[:, j] = bad
            valid = new >= 0
            taken[valid, new[valid]] = True
        return out, rerouted

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        logits = self.gate_logits(x)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        ids = torch.topk(probs, self.k, dim=-1).indices  # [T, k]
        rerouted = torch.zeros_like(ids, dtype=torch.bool)
        if self.training and self.expert_dropout > 0:
            dropped = torch.rand(probs.shape, device=probs.device) < self.expert_dropout  # [T, E]
            ids, rerouted = self.reroute(probs, ids, dropped)
        empty = ids < 0
        weights = probs.gather(1, ids.clamp_min(0)).masked_fill(empty, 0.0)  # [T, k]
        if self.normalize:
            weights = renormalize(weights)
        aux = balance_losses(
            probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=self.z_loss,
            seq_len=seq_len_of(context),
        )
        if self.variance_loss and self.cluster_size > 1:
            aux["cluster_variance"] = self.variance_loss * cluster_variance_loss(probs, self.cluster_size)
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, meta={"rerouted": rerouted})
