"""Hash routing: a token's experts are a fixed random function of its token id.

Roller et al. 2021, "Hash Layers For Large Sparse Models": no learned router; each token id is
mapped to an expert by a fixed hash chosen before training (the paper's "Random Hash" is a random
lookup table over the vocabulary), and with several hashes a token uses k experts.

Choice made here: instead of a [V, k] lookup table, the assignment comes from a seeded integer hash
of (token id, expert): each token ranks all E experts by hash(seed, id, e) and takes the k first.
For a fixed seed that is a fixed random function of the id, distributed like the paper's random
table (uniform over the k-subsets of experts, independent across ids), but it needs no vocabulary
size, no buffer, works for any tokenizer, and is exact integer arithmetic, so it gives the same
experts on every device and in every batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, check_input, check_int
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds) on int64 tensors holding values < 2^32."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def hash_experts(token_ids: Tensor, num_experts: int, k: int, seed: int) -> Tensor:
    """token_ids [T] (int, >= 0) -> LongTensor [T, k] of k distinct experts per id, fixed by `seed`."""
    t = _mix32((token_ids.long() & _MASK32) ^ _mix32(torch.tensor(seed & _MASK32)))  # [T]
    e = torch.arange(num_experts, device=token_ids.device)  # [E]
    key = _mix32(t[:, None] ^ (_mix32(e + 0x9E3779B1) & _MASK32)[None, :])  # [T, E] in [0, 2^32)
    key = key * num_experts + e  # break ties by expert id, stays < 2^48
    return torch.topk(key, k, dim=-1).indices  # [T, k], distinct


@register_router("hash")
class HashRouter(Router):
    """Experts fixed by a hash of the token id; weights 1/k; no parameters.

    Args:
        dim: model width D (only checked against the input).
        num_experts: E.
        k: distinct experts per token.
        seed: selects the hash function (a different seed, a different random assignment).

    Needs `RoutingContext.token_ids` [T] (`MoE.forward(x, token_ids=...)` flattens [B, L] ids). Logits are the
    0/1 indicator [T, E] of the chosen experts (there are no scores).
    """

    needs_token_ids = True
    expert_dims = None  # no expert-set surgery: a hash of (token id, expert id) picks experts, so any
    # change of the expert set would reassign the tokens of kept experts too

    def __init__(self, *, dim: int, num_experts: int, k: int = 1, seed: int = 0) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        check_int(self.who, seed=seed)
        self.seed = seed

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D], context.token_ids: [T] -> Routing with expert_ids/weights [T, k], logits [T, E]."""
        who = self.who
        check_input(x, self.dim, who, finite=True)
        T = x.shape[0]
        token_ids = context.token_ids if context is not None else None
        if token_ids is None:
            raise ValueError(
                f"{who} routes by token id: pass context=RoutingContext(token_ids=LongTensor [T]) "
                "(to MoE.forward: token_ids=[B, L] ids matching the [B, L, D] input)"
            )
        if not isinstance(token_ids, Tensor) or token_ids.dtype.is_floating_point or token_ids.is_complex():
            raise TypeError(f"{who}: context.token_ids must be an integer tensor, got {token_ids!r}")
        token_ids = token_ids.reshape(-1).to(x.device)
        if token_ids.numel() != T:
            raise ValueError(f"{who}: got {token_ids.numel()} token ids for {T} tokens")
        if T and int(token_ids.min()) < 0:
            raise ValueError(f"{who}: token ids must be >= 0, found {int(token_ids.min())}")
        ids = hash_experts(token_ids, self.num_experts, self.k, self.seed)  # [T, k]
        weights = torch.full((T, self.k), 1.0 / self.k, dtype=x.dtype, device=x.device)
        logits = torch.zeros(T, self.num_experts, dtype=x.dtype, device=x.device).scatter_(1, ids, 1.0)
        return Routing(ids, weights, logits, self.num_experts)
