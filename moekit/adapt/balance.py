"""LoRAMoE's localized balancing constraint.

Dou et al. 2024, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin"
(ACL 2024, arXiv:2312.09979). The E experts of a layer are split into groups (the paper: "world knowledge" and
"downstream task" experts) and every training sample has a type. With the importance matrix

    Q[n, m] = sum over the tokens j of sample m of G(x_j)[n]          (the router's soft gate of expert n)

and the coefficient matrix I[n, m] = 1 + delta when expert n's group is sample m's type, else 1 - delta,

    L_lbc = var(Z) / mean(Z),        Z = I * Q (elementwise),  over all N x M entries

(population variance). Inside a group the loss pushes the experts towards equal importance; between groups the
coefficients let the experts of a sample's own group take more of it. The model's loss is L + beta * L_lbc.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_group_ids(num_experts: int, groups: int, device: torch.device | None = None) -> Tensor:
    """LongTensor [E]: the group of each expert, G contiguous groups as equal as possible (expert n: n * G // E)."""
    return torch.arange(num_experts, device=device) * groups // num_experts


def localized_balance_loss(gates: Tensor, sample_groups: Tensor, *, groups: int, delta: float) -> Tensor:
    """gates [M, L, E] (each token's gate over the E experts, M samples of L tokens), sample_groups LongTensor [M]
    (each sample's type in [0, groups)) -> the scalar var(Z) / mean(Z) (float32)."""
    if gates.dim() != 3:
        raise ValueError(f"localized_balance_loss: gates must be [M, L, E], got {tuple(gates.shape)}")
    m, _, e = gates.shape
    if sample_groups.shape != (m,):
        raise ValueError(f"localized_balance_loss: sample_groups must be [M={m}] (one type per sample), got "
                         f"{tuple(sample_groups.shape)}")
    if sample_groups.numel() and not (0 <= int(sample_groups.min()) and int(sample_groups.max()) < groups):
        raise ValueError(f"localized_balance_loss: sample groups must lie in [0, {groups}), got "
                         f"{sample_groups.tolist()}")
    q = gates.float().sum(dim=1).T  # [E, M]
    same = expert_group_ids(e, groups, gates.device)[:, None] == sample_groups.to(gates.device)[None, :]  # [E, M]
    z = q * torch.where(same, 1.0 + delta, 1.0 - delta)
    return z.var(unbiased=False) / z.mean()


def localized_balance_aux(gates: Tensor, lead_shape: tuple[int, ...], sample_groups: Tensor | None, *, groups: int,
                          delta: float, coef: float, who: str) -> Tensor:
    """coef * L_lbc of one adapted layer's forward: gates [T, E] with T = prod(lead_shape) (the input's leading
    dims, [M, L] or [L]: one sample). A training forward without sample groups is an error naming the setter."""
    if sample_groups is None:
        raise ValueError(f"{who}: localized_balance > 0 needs each training sample's group; call "
                         "moekit.adapt.set_sample_groups(model, groups [batch]) before the forward")
    m = 1 if len(lead_shape) < 2 else int(torch.tensor(lead_shape[:-1]).prod())
    return coef * localized_balance_loss(gates.reshape(m, -1, gates.shape[-1]), sample_groups, groups=groups,
                                         delta=delta)
