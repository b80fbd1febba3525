"""Expert activations by name."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,  # gated: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")
    "gelu": F.gelu,  # gated: GeGLU
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function `name`; an unknown name lists the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None
