"""Activation functions named as checkpoint configs name them (`hidden_act`, `activation_function`)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def activation_by_name(name: str) -> Activation:
    """'gelu' is the exact erf GELU; 'gelu_pytorch_tanh' is GELU's tanh approximation, as torch computes it."""
    table: dict[str, Activation] = {
        "gelu": F.gelu,
        "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(table))}")
    return table[name]
