"""Expert activations by name.

`get_activation(name, **args)` returns an `Activation`: `act(x)` applies it element-wise (plain
experts, dense MLPs), `act.glu(gate, up)` gives the gated product of gated (GLU) experts, and
`grad` / `glu_grad` (`glu_with_grad`: output and gradients together) are their derivatives, for
backends that write their own backward pass (moekit.layers.fused_mlp). Element-wise activations are
listed in `ACTIVATIONS`; gated-only ones, which act on gate and up together and take arguments, in
`GATED_ACTIVATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,  # gated: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")
    "gelu": F.gelu,  # gated: GeGLU
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}

# d act(x)/dx * grad, for the element-wise activations above.
_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "relu": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0),
}


class Activation:
    """An element-wise activation `act` and the gated product act(gate) * up built on it."""

    gated_only = False  # True: only `glu` is defined (the activation needs both halves)

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn = ACTIVATIONS[name]

    def __call__(self, x: Tensor) -> Tensor:
        """act(x), element-wise."""
        return self.fn(x)

    def glu(self, gate: Tensor, up: Tensor) -> Tensor:
        """gate, up: [..., F] -> act(gate) * up [..., F]."""
        return self.fn(gate) * up

    def grad(self, grad: Tensor, x: Tensor) -> Tensor:
        """d act(x)/dx * grad."""
        return _GRADS[self.name](grad, x)

    def glu_grad(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of `glu(gate, up)` for the output gradient `grad`: (d gate, d up)."""
        return self.glu_with_grad(grad, gate, up)[1:]

    def glu_with_grad(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(glu(gate, up), d gate, d up) for the output gradient `grad`, computing act(gate) once (a
        backward pass that recomputes the forward's output needs both)."""
        ag = self.fn(gate)
        return ag * up, self.grad(grad * up, gate), grad * ag

    def args(self) -> dict[str, Any]:
        """JSON-ready arguments (none for element-wise activations)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.args()})"


class ClampedSwiGLU(Activation):
    """SwiGLU with clamped inputs: s(min(gate, limit)) * (clamp(up, -limit, limit) + up_offset),
    where s(g) = g * sigmoid(alpha * g) (SiLU when alpha = 1).

    HY-V4 (transformers `HYV4Experts`): limit = `swiglu_limit`, alpha = 1, up_offset = 0.
    GPT-OSS: limit = 7, alpha = 1.702, up_offset = 1.

    Args:
        limit: clamp bound (> 0); the gate is clamped from above only, up on both sides.
        alpha: slope inside the sigmoid (> 0); 1 computes `F.silu`, as HY-V4 does.
        up_offset: added to the clamped up projection.
    """

    gated_only = True

    def __init__(self, *, limit: float, alpha: float = 1.0, up_offset: float = 0.0) -> None:
        for field, v in (("limit", limit), ("alpha", alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"clamped_swiglu: {field} must be a number > 0, got {v!r}")
        if isinstance(up_offset, bool) or not isinstance(up_offset, (int, float)):
            raise ValueError(f"clamped_swiglu: up_offset must be a number, got {up_offset!r}")
        self.name = "clamped_swiglu"
        self.limit, self.alpha, self.up_offset = float(limit), float(alpha), float(up_offset)

    def __call__(self, x: Tensor) -> Tensor:
        raise ValueError("clamped_swiglu acts on gate and up together: it needs gated experts (gated=True)")

    def _swish(self, g: Tensor) -> Tensor:
        return F.silu(g) if self.alpha == 1.0 else g * torch.sigmoid(g * self.alpha)

    def glu(self, gate: Tensor, up: Tensor) -> Tensor:
        g = gate.clamp(max=self.limit)
        u = up.clamp(min=-self.limit, max=self.limit)
        if self.up_offset:
            u = u + self.up_offset
        return self._swish(g) * u

    def grad(self, grad: Tensor, x: Tensor) -> Tensor:
        raise ValueError("clamped_swiglu has no element-wise derivative; use glu_grad")

    def glu_with_grad(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g = gate.clamp(max=self.limit)
        u = up.clamp(min=-self.limit, max=self.limit)
        if self.up_offset:
            u = u + self.up_offset
        gu = grad * u
        if self.alpha == 1.0:
            sw, d_g = F.silu(g), torch.ops.aten.silu_backward(gu, g)
        else:
            sig = torch.sigmoid(g * self.alpha)
            sw, d_g = g * sig, gu * sig * (1 + self.alpha * g * (1 - sig))  # sw: `_swish(g)`
        d_gate = d_g * (gate <= self.limit)  # clamp passes the gradient where it does not bind
        d_up = grad * sw * ((up >= -self.limit) & (up <= self.limit))
        return sw * u, d_gate, d_up

    def args(self) -> dict[str, Any]:
        return {"limit": self.limit, "alpha": self.alpha, "up_offset": self.up_offset}


GATED_ACTIVATIONS: dict[str, type[Activation]] = {"clamped_swiglu": ClampedSwiGLU}


def get_activation(name: str, **args: Any) -> Activation:
    """The activation `name` with its arguments; an unknown name lists the known ones."""
    if name in ACTIVATIONS:
        if args:
            raise ValueError(f"activation {name!r} takes no arguments, got {sorted(args)}")
        return Activation(name)
    if name in GATED_ACTIVATIONS:
        try:
            return GATED_ACTIVATIONS[name](**args)
        except TypeError as e:
            raise ValueError(f"activation {name!r}: {e}") from None
    known = sorted([*ACTIVATIONS, *GATED_ACTIVATIONS])
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(known)}")
