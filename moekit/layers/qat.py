"""Quantization-aware experts: full-precision latent weights, binary or ternary weights in the forward pass, and a
straight-through estimator in the backward pass (training lives in `moekit.compress.qat`).

- "binary": BinaryConnect (Courbariaux et al. 2015, "BinaryConnect: Training Deep Neural Networks with binary
  weights during propagations"), deterministic form, with a per-row scale as in XNOR-Net (Rastegari et al. 2016):
  W_q = alpha * sign(W), alpha = mean |W| over the row (sign(0) = +1).
- "ternary": ternary weight networks (Li et al. 2016, "Ternary Weight Networks"), the ternary experts of MoTE
  ("MoTE: Mixture of Ternary Experts for Memory-efficient Large Multimodal Models"): per row, threshold
  delta = 0.7 * mean |W|, W_q = alpha * sign(W) * [|W| > delta], alpha = mean |W| over the entries above delta
  (0 for a row with none).

A row is one output unit of one expert: gate_up_proj [E, 2F, D] has rows of D inputs, down_proj [E, D, F] rows of
F inputs. The straight-through estimator passes the gradient with respect to W_q unchanged to W (the scale is
treated as a constant of the quantizer; BinaryConnect's identity STE).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.layers.dispatch import get_backend, plan
from moekit.layers.experts import Experts, check_input_dtype
from moekit.routing.routing import Routing

QAT_MODES = ("binary", "ternary")
TERNARY_THRESHOLD = 0.7  # delta = 0.7 * mean |W| (Ternary Weight Networks)


def binarize(w: Tensor) -> Tensor:
    """BinaryConnect weights with a per-row scale: mean |w| over the last dim x sign(w) (sign(0) = +1)."""
    alpha = w.abs().mean(-1, keepdim=True)
    return torch.where(w >= 0, alpha, -alpha)


def ternarize(w: Tensor, threshold: float = TERNARY_THRESHOLD) -> Tensor:
    """Ternary weights {-alpha, 0, +alpha} per row (last dim): delta = threshold x mean |w|, entries with
    |w| > delta keep their sign, alpha = mean |w| over them (0 where a row has none)."""
    a = w.abs()
    keep = a > threshold * a.mean(-1, keepdim=True)
    n = keep.sum(-1, keepdim=True)
    alpha = torch.where(n > 0, (a * keep).sum(-1, keepdim=True) / n.clamp_min(1), torch.zeros_like(n, dtype=w.dtype))
    return torch.sign(w) * keep * alpha


QUANTIZERS = {"binary": binarize, "ternary": ternarize}


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weights exactly; backward: the gradient passes to the latent weights unchanged."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, mode: str) -> Tensor:
        return QUANTIZERS[mode](w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def quantize_ste(w: Tensor, mode: str) -> Tensor:
    """QUANTIZERS[mode](w) in the forward pass, identity in the backward pass."""
    if mode not in QUANTIZERS:
        raise ValueError(f"quantize_ste: mode must be one of {list(QAT_MODES)}, got {mode!r}")
    return _StraightThrough.apply(w, mode)


class _Weights:
    """What a dispatch backend reads of an experts module, with quantized weights in place of the latent ones."""

    def __init__(self, experts: Experts, weights: dict[str, Tensor]) -> None:
        self.act, self.gated = experts.act, experts.gated
        self.gate_up_proj = weights.get("gate_up_proj")
        self.up_proj = weights.get("up_proj")
        self.down_proj = weights["down_proj"]


class QATExperts(Experts):
    """Fused `Experts` (same parameters and state-dict names, so a trained model's weights load into it) whose
    forward uses `mode`-quantized weights with a straight-through estimator; the parameters are the full-precision
    latent weights the optimiser updates. `materialize()` gives plain `Experts` holding the quantized values.

    Args: those of `Experts`, plus mode: "binary" | "ternary".
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "silu",
        activation_args: dict[str, Any] | None = None,
        gated: bool = True,
        backend: str = "auto",
        mode: str = "ternary",
    ) -> None:
        if mode not in QAT_MODES:
            raise ValueError(f"QATExperts: mode must be one of {list(QAT_MODES)}, got {mode!r}")
        super().__init__(num_experts=num_experts, dim=dim, hidden=hidden, activation=activation,
                         activation_args=activation_args, gated=gated, backend=backend)
        self.mode = mode

    def quantized(self, *, ste: bool = True) -> dict[str, Tensor]:
        """name -> the quantized weight of every projection (through the STE when `ste`)."""
        q = (lambda w: quantize_ste(w, self.mode)) if ste else QUANTIZERS[self.mode]
        return {name: q(w) for name, w in self.named_parameters(recurse=False)}

    def forward(self, x: Tensor, routing: Routing, *, backend: str | None = None) -> Tensor:
        """x [T, D], routing [T, k] -> [T, D], computed with the quantized weights."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"QATExperts: expected input [T, {self.dim}], got {tuple(x.shape)}")
        if routing.num_experts != self.num_experts:
            raise ValueError(f"QATExperts: routing is over {routing.num_experts} experts but this layer has "
                             f"{self.num_experts}")
        if x.dtype != self.down_proj.dtype:
            check_input_dtype("QATExperts", x, self.down_proj.dtype)
        fn = get_backend(backend or self.backend)
        p = plan(routing.expert_ids, self.num_experts, offset=self.expert_offset, num_local=self.num_local_experts)
        return fn(x.contiguous(), p, routing.weights, _Weights(self, self.quantized()))

    @torch.no_grad()
    def materialize(self) -> Experts:
        """Plain `Experts` (same config) whose weights are the quantized values."""
        args = {k: v for k, v in self.config().items() if k != "mode"}
        with torch.device("meta"):
            out = Experts(**args)
        for name, w in self.quantized(ste=False).items():
            setattr(out, name, torch.nn.Parameter(w.detach().clone(), requires_grad=getattr(self, name).requires_grad))
        return out

    def config(self) -> dict[str, Any]:
        return {**super().config(), "mode": self.mode}
