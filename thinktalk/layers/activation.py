"""Activation functions named as checkpoint configs name them (`hidden_act`, `activation_function`)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]

QUICK_GELU_SCALE = 1.702  # CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU approximated by a sigmoid (CLIP's `quick_gelu`; the vision config of transformers' own tiny
    Qwen3-Omni test model uses it)."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,  # the exact erf GELU
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),  # GELU's tanh approximation, as torch computes it
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation_by_name(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]
