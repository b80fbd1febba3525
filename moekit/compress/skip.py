"""NAEE dynamic expert skipping (Lu et al. 2024, "Not All Experts are Equal"): at inference, a token's
second (and later) expert is dropped when its weight is below beta x the token's top weight, with beta
per layer the median over calibration tokens of (second weight / top weight).

Implemented as `SkippingRouter`, a wrapper around a layer's router that returns the same `Routing` with
those slots emptied (`expert_ids` -1, `weights` 0: the routing contract's empty slot, so every dispatch
backend skips their compute). The remaining weights are NOT renormalised (the token's output loses the
dropped term, as in the paper). The wrapper is an inference option: it is not a registered router, so
a model with skipping enabled is not saved (`disable_skipping` first) and expert surgery must happen
before `enable_skipping`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import Calibration, moe_layers
from moekit.routing.routing import Routing


class SkippingRouter(nn.Module):
    """Wrap `router`: slots after a token's top one whose weight < beta x the top weight become empty."""

    def __init__(self, *, router: nn.Module, beta: float) -> None:
        super().__init__()
        if not 0 <= beta <= 1:
            raise ValueError(f"SkippingRouter: beta must be in [0, 1], got {beta!r}")
        self.inner = router
        self.beta = float(beta)

    def __getattr__(self, name: str) -> Any:  # num_experts, dim, k, needs_full_sequence, ... of the router
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x: Tensor, *, context: Any = None) -> Routing:
        """x [T, D] -> the inner router's Routing with skipped slots emptied."""
        r = self.inner(x, context=context)
        return skip_slots(r, self.beta)


def skip_slots(routing: Routing, beta: float) -> Routing:
    """The routing with every slot but each token's largest emptied when its weight < beta x the largest."""
    w, ids = routing.weights, routing.expert_ids
    filled = ids >= 0
    wf = torch.where(filled, w, torch.zeros_like(w))
    top = wf.max(dim=-1, keepdim=True)
    is_top = torch.zeros_like(filled).scatter_(1, top.indices, True)
    drop = filled & ~is_top & (wf < beta * top.values)
    return Routing(ids.masked_fill(drop, -1), w.masked_fill(drop, 0), routing.logits, routing.num_experts,
                   aux=routing.aux, dropped=routing.dropped, meta=routing.meta, state=routing.state)


def enable_skipping(model: nn.Module, calibration: Calibration | None = None, *,
                    beta: float | dict[int, float] | None = None) -> dict[int, float]:
    """Wrap the router of every MoE layer of `model` in a `SkippingRouter`; beta per block from `beta`
    (one number, or block -> number) or else from `calibration` (`LayerStats.skip_beta`, the median ratio).
    Returns block -> beta. Chain-of-Experts layers (several routers) are not supported."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"enable_skipping: {type(model).__name__} has no MoE layers")
    betas = {}
    for b, layer in layers:
        if layer.iterations > 1:
            raise ValueError(f"enable_skipping: block {b} is a Chain-of-Experts layer; not supported")
        if isinstance(layer.router, SkippingRouter):
            raise ValueError(f"enable_skipping: block {b} already skips (disable_skipping first)")
        if isinstance(beta, dict):
            betas[b] = beta[b]
        elif beta is not None:
            betas[b] = float(beta)
        elif calibration is not None:
            betas[b] = calibration.layer(b).skip_beta()
        else:
            raise ValueError("enable_skipping: pass a calibration or beta")
    for b, layer in layers:
        layer.router = SkippingRouter(router=layer.router, beta=betas[b])
    return betas


def disable_skipping(model: nn.Module) -> None:
    """Put every wrapped router back."""
    for _, layer in moe_layers(model):
        if isinstance(layer.router, SkippingRouter):
            layer.router = layer.router.inner
