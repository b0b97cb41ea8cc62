"""Causal 1-D convolutions and the small blocks built from them, each usable one-shot or streaming.

All tensors here are (batch, channels, time). Every block is *causal up to a fixed lookahead*, so a long signal can
be processed in pieces that, concatenated, equal processing it whole:

    CausalConv1d             y[t] depends on x[t - (k-1)*d .. t]. One-shot: left zero padding. Streaming: the
                             last (k-1)*d inputs of the previous piece replace the zeros.
    CausalTransposeConv1d    upsamples by `stride` with kernel k in {stride, 2*stride}; the reference trims
                             k - stride samples on both sides, so the output for input step i is final only once
                             input i + ceil(k/stride) - 1 has arrived. Streaming keeps those inputs as context.
    ConvNeXtBlock            depthwise CausalConv1d -> LayerNorm -> Linear -> GELU -> Linear, scaled residual.
    SnakeBeta                x + sin^2(x * e^alpha) / e^beta, elementwise (no state).

A `StreamState` holds the carried context of every conv of one stream, keyed by module; `state=None` means one-shot.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# Architecture constants of the ConvNeXt block (Liu et al. 2022) as the vocoder uses it; not in any config.
CONVNEXT_KERNEL = 7
CONVNEXT_EXPANSION = 4
CONVNEXT_LAYERNORM_EPS = 1e-6
CONVNEXT_GAMMA_INIT = 1e-6
# Guards SnakeBeta's 1 / e^beta against underflow, as the checkpoint was trained with.
SNAKE_EPS = 1e-9


class StreamState:
    """Per-module input context that streaming convolutions carry from one call to the next."""

    def __init__(self):
        self._context: dict[nn.Module, torch.Tensor] = {}

    def context(self, module: nn.Module) -> torch.Tensor | None:
        """The inputs `module` kept from earlier calls, (batch, channels, kept); None before its first call."""
        return self._context.get(module)

    def keep(self, module: nn.Module, context: torch.Tensor) -> None:
        self._context[module] = context

    def modules(self) -> list[nn.Module]:
        """The modules holding context, in the order they first kept it."""
        return list(self._context)


class CausalConv1d(nn.Module):
    """Stride-1 causal convolution; `conv` holds the checkpoint's `conv.weight` / `conv.bias`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.receptive = (kernel_size - 1) * dilation  # past inputs each output sees

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (batch, in, time) -> (batch, out, time)
        if x.shape[-1] == 0:  # nothing new this call: no output, context unchanged
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        if state is None:
            return self.conv(F.pad(x, (self.receptive, 0)))
        past = state.context(self)
        if past is None:  # stream start: the same zeros the one-shot pads with
            past = x.new_zeros(x.shape[0], x.shape[1], self.receptive)
        x = torch.cat((past, x), dim=-1)  # (batch, in, receptive + time)
        state.keep(self, x[..., x.shape[-1] - self.receptive:])
        return self.conv(x)


class CausalTransposeConv1d(nn.Module):
    """Transposed convolution that upsamples by `stride`, trimming kernel - stride samples on each side.

    One-shot, L inputs give L*stride - (kernel - stride) outputs: the trimmed right edge is the part that would
    also need input L. Streaming emits exactly the samples that are final, so the pieces concatenate to the one-shot.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if not stride <= kernel_size <= 2 * stride:
            raise ValueError(f"kernel_size ({kernel_size}) must lie in [stride, 2*stride] (stride={stride})")
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim = kernel_size - stride  # samples the reference drops at each end
        self.lookahead = math.ceil(kernel_size / stride) - 1  # later inputs an output step still needs

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (batch, in, time) -> (batch, out, ~time * stride)
        steps = x.shape[-1]
        if steps == 0:  # nothing new this call: no output, context unchanged
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        if state is None:
            return self.conv(x)[..., self.trim: steps * self.stride]
        past = state.context(self)
        if past is None:  # stream start: emit from the reference's left trim on
            start = self.trim
        else:  # the kept inputs' outputs were emitted up to where this call's inputs begin to contribute
            x = torch.cat((past, x), dim=-1)
            start = past.shape[-1] * self.stride
        state.keep(self, x[..., x.shape[-1] - min(self.lookahead, x.shape[-1]):])
        # an output sample is final once no later input reaches it: local index < (inputs held) * stride
        return self.conv(x)[..., start: x.shape[-1] * self.stride]


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(GELU(pwconv1(LayerNorm(dwconv(x))))), the norm and MLP acting per time step."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, CONVNEXT_KERNEL, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=CONVNEXT_LAYERNORM_EPS)
        self.pwconv1 = nn.Linear(dim, CONVNEXT_EXPANSION * dim)
        self.pwconv2 = nn.Linear(CONVNEXT_EXPANSION * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), CONVNEXT_GAMMA_INIT))

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (batch, dim, time)
        h = self.dwconv(x, state).transpose(1, 2)  # (batch, time, dim)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class SnakeBeta(nn.Module):
    """Periodic activation with per-channel log-frequency `alpha` and log-magnitude `beta`."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, channels, time); parameters broadcast over batch and time
        frequency = self.alpha.exp().view(1, -1, 1)
        magnitude = 1.0 / (self.beta.exp().view(1, -1, 1) + SNAKE_EPS)
        return x + magnitude * torch.sin(x * frequency).pow(2)
