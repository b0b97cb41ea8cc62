"""Quantized matrices as plain tensors, the one form every checkpoint format decodes into before it is stored.

    IntMatrix   w[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]     g(k) = group_of[k], or k // group_size
    Fp8Matrix   w[n, k] = e4m3[n, k] * scale[n, k // block_k]            (block scales repeated over their rows)

Formats differ in how they pack q and zero into int32 words, which dimension they pack along, and what offset they
store; they all end here, so the stored forms (matrices.py) have one way in. Rows can be concatenated exactly
(an expert's gate_proj and up_proj become the rows of one gate_up matrix), and `quantize_int` / `quantize_fp8`
are the round-to-nearest quantizers of quantize-on-load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantizationError

FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass
class IntMatrix:
    q: torch.Tensor  # (N, K) integer tensor, values in [0, 2**bits)
    scale: torch.Tensor  # (N, G) float32
    zero: torch.Tensor  # (N, G) float32 (whole numbers in [0, 2**bits) for every format thinktalk reads)
    bits: int
    group_of: torch.Tensor | None = None  # (K,) int64 group of each input channel; None: contiguous groups

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    def group_index(self) -> torch.Tensor:
        """(K,) the group of every input channel."""
        if self.group_of is not None:
            return self.group_of
        k = self.q.shape[1]
        return torch.arange(k, device=self.q.device) // (k // self.groups)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        index = self.group_index()
        return (self.q.float() - self.zero[:, index]) * self.scale[:, index]


@dataclass
class Fp8Matrix:
    weight: torch.Tensor  # (N, K) float8_e4m3fn
    scale: torch.Tensor  # (N, ceil(K / block_k)) float32
    block_k: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        k = self.weight.shape[1]
        return self.weight.float() * self.scale.repeat_interleave(self.block_k, dim=1)[:, :k]


def fp8_block_scales_to_rows(scale: torch.Tensor, block_n: int, rows: int) -> torch.Tensor:
    """(ceil(N / block_n), Kb) per-block scales -> (N, Kb), each block's scale repeated over its rows."""
    return scale.float().repeat_interleave(block_n, dim=0)[:rows].contiguous()


def concat_rows(parts: list[IntMatrix | Fp8Matrix]) -> IntMatrix | Fp8Matrix:
    """Stack matrices with the same input layout along the output dimension (exact)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Fp8Matrix):
        assert all(isinstance(p, Fp8Matrix) and p.block_k == first.block_k for p in parts)
        return Fp8Matrix(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), first.block_k)
    assert all(isinstance(p, IntMatrix) and p.bits == first.bits and p.groups == first.groups for p in parts)
    if any(not torch.equal(p.group_index(), first.group_index()) for p in parts[1:]):
        raise QuantizationError("matrices fused into one (an expert's gate_proj and up_proj) assign their input "
                                "channels to groups differently (g_idx); they must share one input order "
                                "(thinktalk permutes the fused matrix's input channels once, for all its rows)")
    return IntMatrix(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                     torch.cat([p.zero for p in parts]), first.bits, first.group_of)


def quantize_int(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> IntMatrix:
    """Round-to-nearest quantization of a (N, K) float matrix, one scale (and zero) per row and group."""
    n, k = weight.shape
    group = k if group_size is None else group_size
    assert k % group == 0, (k, group)
    w = weight.float().view(n, k // group, group)
    top = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)  # the range always holds 0
        scale = ((high - low) / top).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (-low / scale).round().clamp(0, top)
    q = (w / scale.unsqueeze(-1)).round() + zero.unsqueeze(-1)
    q = q.clamp(0, top).to(torch.uint8 if bits <= 8 else torch.int32).view(n, k)
    return IntMatrix(q, scale, zero, bits)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> Fp8Matrix:
    """E4M3 with one scale per (block_n, block_k) tile (edge tiles partial), stored repeated per row."""
    block_n, block_k = block
    n, k = weight.shape
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, -k % block_k, 0, -n % block_n))
    tiles = padded.view(padded.shape[0] // block_n, block_n, padded.shape[1] // block_k, block_k)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=torch.finfo(torch.float32).tiny)  # (Nb, Kb)
    scale = fp8_block_scales_to_rows(amax / FP8_E4M3_MAX, block_n, n)  # (N, Kb)
    expanded = scale.repeat_interleave(block_k, dim=1)[:, :k]
    e4m3 = (w / expanded).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8Matrix(e4m3, scale, block_k)
