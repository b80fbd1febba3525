"""Prototypical routing with a routing contrastive loss, and ProMoE's conditional/unconditional split.

Wei et al. 2025, "Routing Matters in MoE: Scaling Diffusion Transformers with Explicit Routing
Guidance" (ProMoE, ICLR 2026). ProMoE's router works in two steps:

1. Conditional routing: tokens are split by functional role. Unconditional tokens (in a diffusion
   transformer, the image tokens of the classifier-free-guidance pass without the class condition)
   go to dedicated unconditional experts; conditional tokens go on to step 2.
2. Prototypical routing: each routed expert e owns a learnable prototype P_e; a token is projected
   to the prototype space, z = W x, and scored by cosine similarity, s_e = cos(z, P_e) / tau;
   top-k of softmax(s).

The routing contrastive loss (RCL) makes the prototypes meaningful: the tokens assigned to an expert
should be close to its prototype (intra-expert coherence) and far from the other prototypes
(inter-expert diversity). moekit's form: with c_e the normalised mean of the z of the tokens whose
first choice is e, RCL = mean_e -log softmax_j(cos(c_e, P_j) / tau)_e over the experts that received
tokens (an InfoNCE with the own prototype as positive, the others as negatives).

Unconditional tokens are marked by `RoutingContext.uncond`, a bool tensor [T] (or [B, L] through the MoE
layer); the last `num_uncond` experts serve them (scored by their own prototypes). Without the mask
every token is conditional. In a language model there is no unconditional pass, so the split is off
by default (num_uncond=0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.routing.base import Router, check_k, check_logits, check_positive, renormalize, seq_len_of
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext
from moekit.utils.checks import is_positive_int


def routing_contrastive_loss(z: Tensor, prototypes: Tensor, first_choice: Tensor, temperature: float) -> Tensor:
    """RCL: InfoNCE between each expert's token centroid and the prototypes.

    z: [T, P] token embeddings, prototypes: [E, P], first_choice: [T] expert ids (-1 ignored).
    Returns a scalar (0 when no token is assigned).
    """
    E = prototypes.shape[0]
    valid = first_choice >= 0
    onehot = F.one_hot(first_choice[valid], E).to(z.dtype)  # [T', E]
    counts = onehot.sum(dim=0)  # [E]
    used = counts > 0
    if not bool(used.any()):
        return z.sum() * 0.0
    centroids = F.normalize(onehot.t() @ F.normalize(z[valid], dim=-1), dim=-1)  # [E, P]
    sim = centroids @ F.normalize(prototypes, dim=-1).t() / temperature  # [E, E]
    target = torch.arange(E, device=z.device)
    return F.cross_entropy(sim[used], target[used])


@register_router("prototype")
class PrototypeRouter(Router):
    """Top-k by cosine similarity to learnable expert prototypes, with the routing contrastive loss.

    Args:
        dim: model width D.
        num_experts: E (the last num_uncond of them reserved for unconditional tokens).
        k: experts per token.
        proto_dim: width of the prototype space (None: D).
        temperature: tau dividing the cosine similarities (ProMoE-like: 0.1 to 1).
        contrastive: coefficient of the routing contrastive loss (aux["contrastive"]).
        num_uncond: unconditional experts (0: no conditional/unconditional split).
        normalize: rescale the k kept probabilities to sum 1.
        load_balance: coefficient of the Switch load-balance loss.

    Parameters: `proj [proto_dim, D]` (Linear), `prototypes [E, proto_dim]`.
    """

    expert_dims = {"prototypes": 0}  # per-expert prototypes (moekit.layers.surgery)

    def expert_args(self, sources: list[list[int]], requested: dict) -> dict:
        """Expert-set surgery: the unconditional experts must stay last and apart; num_uncond follows them."""
        if not self.num_uncond or "num_uncond" in requested:
            return {}
        first = self.num_experts - self.num_uncond
        kinds = [bool(src) and all(s >= first for s in src) for src in sources]  # True: unconditional
        mixed = [j for j, src in enumerate(sources) if not src or any(s >= first for s in src) != kinds[j]]
        if mixed or kinds != sorted(kinds):
            raise ValueError(
                f"{type(self).__name__}: the {self.num_uncond} unconditional experts (ids >= {first}) must stay "
                f"last and unmixed with conditional or new ones; got new experts from old ids {sources}"
            )
        return {"num_uncond": sum(kinds)}

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        proto_dim: int | None = None,
        temperature: float = 0.5,
        contrastive: float = 1e-2,
        num_uncond: int = 0,
        normalize: bool = True,
        load_balance: float = 1e-2,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, losses=dict(contrastive=contrastive, load_balance=load_balance),
        )
        who = self.who
        if not isinstance(num_uncond, int) or isinstance(num_uncond, bool) or not 0 <= num_uncond < num_experts:
            raise ValueError(f"{who}: num_uncond must be an integer in [0, num_experts), got {num_uncond!r}")
        check_k(k, num_experts - num_uncond, f"{who} (k over the conditional experts)")
        if proto_dim is not None and not is_positive_int(proto_dim):
            raise ValueError(f"{who}: proto_dim must be None or a positive integer, got {proto_dim!r}")
        check_positive(who, temperature=temperature)
        self.k = k
        self.proto_dim = proto_dim
        self.temperature = temperature
        self.num_uncond = num_uncond
        self.normalize = normalize
        P = proto_dim or dim
        self.proj = nn.Linear(dim, P, bias=False)
        self.prototypes = nn.Parameter(torch.empty(num_experts, P))
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.prototypes, std=1.0)

    def uncond_mask(self, context: RoutingContext | None, T: int, device: torch.device) -> Tensor | None:
        """Bool [T] of unconditional tokens from context.uncond, or None."""
        m = context.uncond if context is not None else None
        if m is None or not self.num_uncond:
            return None
        m = torch.as_tensor(m, device=device).reshape(-1).bool()
        if m.numel() != T:
            raise ValueError(f"{self.who}: context.uncond must hold one flag per token ({T}), got {m.numel()}")
        return m

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E] (cosine / tau)."""
        who = self.who
        z = self.proj(self.checked_input(x, self.proj.weight)).float()  # [T, P]
        logits = F.normalize(z, dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).t() / self.temperature
        check_logits(logits, who)  # [T, E]
        T, E = logits.shape
        C = E - self.num_uncond
        allowed = torch.ones(T, E, dtype=torch.bool, device=x.device)
        if self.num_uncond:
            allowed[:, C:] = False  # conditional tokens: routed experts only
            uncond = self.uncond_mask(context, T, x.device)
            if uncond is not None:
                allowed[uncond] = False
                allowed[uncond, C:] = True  # unconditional tokens: unconditional experts only
        masked = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # [T, E]
        k_avail = allowed.sum(dim=1, keepdim=True)  # [T, 1]
        weights, ids = torch.topk(probs, self.k, dim=-1)
        slot = torch.arange(self.k, device=x.device)[None, :]
        usable = slot < k_avail  # an unconditional token may have fewer than k experts
        ids = torch.where(usable, ids, -1)
        weights = torch.where(usable, weights, torch.zeros((), device=x.device))
        if self.normalize:
            weights = renormalize(weights)
        aux = balance_losses(
            probs, logits, ids, load_balance=self.load_balance, seq_balance=0.0, z=0.0, seq_len=seq_len_of(context),
        )
        if self.contrastive:
            aux["contrastive"] = self.contrastive * routing_contrastive_loss(
                z, self.prototypes.float(), ids[:, 0], self.temperature
            )
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux)
