"""Auxiliary routing losses. Each returns an unscaled scalar; routers scale by their coefficients
and return the result in `Routing.aux` (never in module globals).

Batch statistics go through `moekit.routing.scope`: inside a `batch_scope` (expert parallelism) a loss
is this rank's share of the one-process loss on the batch all ranks hold; the shares sum to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.scope import batch_mean, batch_rows, batch_sum


def expert_fraction(expert_ids: Tensor, num_experts: int) -> Tensor:
    """f [E]: share of the token-slots [T, k] routed to each expert (slots of -1 count for none).

    Normalised by T*k, so a perfectly balanced router has f_i = 1/E. Inside a `batch_scope` the
    counts and T are those of the batch all its ranks hold (`moekit.routing.scope`).
    """
    T, k = expert_ids.shape
    ids = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts + 1, device=ids.device, dtype=torch.float32)
    counts.index_add_(0, ids + 1, torch.ones_like(ids, dtype=torch.float32))
    return batch_sum(counts)[1:] / max(batch_rows(T, ids.device) * k, 1)


def load_balance_loss(probs: Tensor, expert_ids: Tensor, num_experts: int | None = None) -> Tensor:
    """Switch Transformer / GShard load-balancing loss  E * sum_i f_i * P_i.

    Fedus et al. 2021, "Switch Transformers" (eq. 4); Lepikhin et al. 2020, "GShard".

    Args:
        probs: [T, E] routing probabilities (rows sum to 1).
        expert_ids: [T, k] chosen experts (-1 for empty slots).
    Returns:
        scalar; 1.0 when both the dispatch f and the mean probability P are uniform.
    Note: f is the share of token-slots (normalised by T*k); Hugging Face's Mixtral/OLMoE loss
    normalises by T only and so equals k times this value.
    """
    E = probs.shape[-1] if num_experts is None else num_experts
    f = expert_fraction(expert_ids, E).to(probs.dtype)  # [E], no gradient (argmax-like)
    P = batch_mean(probs)  # [E] (this rank's share of it inside a batch scope)
    return E * torch.sum(f * P)


def sequence_load_balance_loss(probs: Tensor, expert_ids: Tensor, seq_len: int) -> Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss: the mean over sequences of E * sum_i f_i P_i,
    with f and P computed within each sequence of `seq_len` consecutive tokens.

    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", eq. 17-20 (f_i = E/(kL) * count_i).
    """
    T, E = probs.shape
    if seq_len <= 0 or T % seq_len:
        raise ValueError(f"sequence_load_balance_loss: T={T} tokens is not a multiple of seq_len={seq_len}")
    B = T // seq_len
    k = expert_ids.shape[1]
    ids = expert_ids.reshape(B, seq_len * k)
    counts = torch.zeros(B, E + 1, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, ids + 1, torch.ones_like(ids, dtype=probs.dtype))
    f = counts[:, 1:] / (seq_len * k)  # [B, E]
    P = probs.reshape(B, seq_len, E).mean(dim=1)  # [B, E]
    return batch_mean(E * (f * P).sum(dim=1))  # mean over the B sequences (a share in a batch scope)


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

    Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert Models", eq. 5.
    """
    return batch_mean(torch.logsumexp(logits.float(), dim=-1).square())


def entropy_loss(probs: Tensor) -> Tensor:
    """Mean entropy of the routing distribution, -sum_i p_i log p_i.

    The dynamic loss of Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
    Models": minimising it keeps top-p routing from spreading over all experts.
    """
    return batch_mean(-(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1))


def balance_losses(
    probs: Tensor,
    logits: Tensor,
    expert_ids: Tensor,
    *,
    load_balance: float,
    seq_balance: float,
    z: float,
    seq_len: int | None,
) -> dict[str, Tensor]:
    """The standard auxiliary losses, scaled by their coefficients; a coefficient of 0 skips one."""
    aux: dict[str, Tensor] = {}
    if load_balance:
        aux["load_balance"] = load_balance * load_balance_loss(probs, expert_ids)
    if seq_balance:
        if seq_len is None:
            raise ValueError(
                "seq_balance > 0 needs the sequence length: pass context=RoutingContext(seq_len=L) or give the MoE "
                "layer a [B, L, D] input"
            )
        aux["seq_balance"] = seq_balance * sequence_load_balance_loss(probs, expert_ids, seq_len)
    if z:
        aux["z_loss"] = z * z_loss(logits)
    return aux
