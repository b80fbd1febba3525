"""Pieces every router uses: input and logit checks, the linear gate, the config round trip.

Routers subclass `Router` only for these helpers (and `nn.Module`); the algorithm lives in each
router's own file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.routing.registry import router_config
from moekit.utils.checks import check_positive_ints, is_positive_int


def check_input(x: Tensor, dim: int, who: str) -> None:
    """Raise if `x` is not a [T, dim] floating tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a Tensor [T, {dim}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{who}: expected input of shape [T, {dim}] (tokens, dim), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}")


def check_logits(logits: Tensor, who: str) -> None:
    """Raise if router logits hold NaN or inf (a silent NaN would route every token to expert 0)."""
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise FloatingPointError(
            f"{who}: router logits contain {bad} non-finite values (NaN or inf); check the input "
            "activations and the router weights"
        )


def check_k(k: int, num_experts: int, who: str) -> None:
    """Raise unless 1 <= k <= num_experts."""
    if not is_positive_int(k) or k > num_experts:
        raise ValueError(f"{who}: k must be an integer in [1, num_experts={num_experts}], got {k!r}")


def check_choice(value: Any, allowed: tuple[str, ...], field: str, who: str) -> None:
    """Raise unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{who}: {field} must be one of {list(allowed)}, got {value!r}")


def seq_len_of(state: dict | None) -> int | None:
    """The sequence length the caller put in `state` (the MoE layer does for [B, L, D] inputs)."""
    if isinstance(state, dict):
        return state.get("seq_len")
    return None


def jitter(x: Tensor, eps: float) -> Tensor:
    """Switch Transformer input jitter: multiply by U(1 - eps, 1 + eps)."""
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


class Router(nn.Module):
    """Common base: `dim`, `num_experts`, a gate weight [E, D] (the Hugging Face router layout)."""

    def __init__(self, *, dim: int, num_experts: int, gate_outputs: int | None = None) -> None:
        super().__init__()
        who = type(self).__name__
        check_positive_ints(f"{who}: ", dim=dim, num_experts=num_experts)
        self.dim = dim
        self.num_experts = num_experts
        if gate_outputs is not None:
            self.weight = nn.Parameter(torch.empty(gate_outputs, dim))
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    def gate_logits(self, x: Tensor) -> Tensor:
        """[T, D] -> [T, E] raw scores of the linear gate, checked for NaN/inf."""
        check_input(x, self.dim, type(self).__name__)
        logits = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)
        check_logits(logits, type(self).__name__)
        return logits

    def config(self) -> dict[str, Any]:
        """JSON-ready {"name", "args"} that `router_from_config` turns back into this router."""
        return router_config(self)

    def extra_repr(self) -> str:
        args = self.config()["args"]
        return ", ".join(f"{k}={v!r}" for k, v in args.items())
