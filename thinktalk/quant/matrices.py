"""Stored forms of quantized matrices, and the products computed from them: y = x @ W[i].T without a float copy of W.

A `QuantMatrices` module holds `count` matrices (count None: one) of shape (out_features, in_features) as
parameters (requires_grad False), so they materialise, move and count like any other weight. Its leading dim is the
expert dim of a fused MoE projection. Three forms (`matrices_for(spec)` picks one):

    Int4Matrices  packed  uint8 (*E, N, K/2)  two codes a byte, in the layout of the device's kernel (int4_layout)
                  scale_zero (*E, K/g, N, 2)  (scale, offset) per group: w = (q - 8) * scale + offset
                  perm    int64 (*E, K)        act-order only: input channel order that makes the groups contiguous
        CPU: torch's `_weight_int4pack_mm_for_cpu` (group 32/64/128/256, x in the model's dtype; bfloat16 is its fast
        path: measured 1.9x faster than a bfloat16 F.linear at batch 1, while its float32 path is 9x slower).
    Int8Matrices  q int8 (*E, N, K); scale (*E, N, G); offset (*E, N, G), asymmetric only: w = q * scale + offset
        CPU, per-channel (G = 1): torch's `_weight_int8pack_mm`, plus x.sum(-1) * offset when asymmetric.
        Grouped int8 (G > 1) dequantises the one matrix it multiplies (correct, not fast; no torch kernel takes it).
    Fp8Matrices   e4m3 (*E, N, K) kept as uint8 bits (a generic `.to(dtype)` must never cast them); scale
                  (*E, N, K/block_k) in the model's dtype
        CPU: dequantised per product, through float16 bit arithmetic (5x faster than torch's fp8 cast here; no CPU
        kernel takes fp8 weights with float activations). FP8 saves memory on the CPU, not time.

Built for CUDA (layout "plain"), every product goes to thinktalk/quant/triton_kernels.py (sync-free, capturable in a
CUDA graph); the same objects on CPU tensors run those kernels in Triton's interpreter, which is how tests check them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from . import int4_layout
from .decoded import Fp8Matrix, IntMatrix
from .spec import INT4_KERNEL_GROUPS, QuantizationError, WeightSpec

INT4_MIDPOINT = 8  # the kernels' code offset: w = (q - 8) * scale + offset
INT8_MIDPOINT = 128  # unsigned 8-bit codes -> signed int8
FP8_TO_HALF_SCALE = 256.0
UNIFORM_INT4_STD = (255 / 12) ** 0.5  # std of codes uniform on 0..15
UNIFORM_INT8_STD = (65535 / 12) ** 0.5  # std of codes uniform on -128..127  # e4m3 bits placed in a float16's exponent/mantissa read 2**-8 of the e4m3 value


def _frozen(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class QuantMatrices(nn.Module, ABC):
    """`count` matrices (None: one) of (out_features, in_features), computed with in `dtype`."""

    def __init__(self, count: int | None, out_features: int, in_features: int, spec: WeightSpec,
                 dtype: torch.dtype, layout: str):
        super().__init__()
        self.count, self.out_features, self.in_features = count, out_features, in_features
        self.spec, self.dtype, self.layout = spec, dtype, layout  # layout: "cpu" or "plain" (CUDA)

    def lead(self) -> tuple[int, ...]:
        return () if self.count is None else (self.count,)

    @abstractmethod
    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x: (M, in_features) in `dtype` -> x @ W[index].T, (M, out_features)."""

    @abstractmethod
    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """W[index] as a (out_features, in_features) tensor in `dtype` (tests, and the slow fallbacks)."""

    @abstractmethod
    def store(self, matrix: IntMatrix | Fp8Matrix, index: int | None = None) -> None:
        """Write one decoded matrix (from a checkpoint or the on-load quantizer) into slot `index`."""

    @abstractmethod
    def random_(self, generator: torch.Generator, std: float) -> None:
        """Fill every matrix with random codes, drawn directly in the stored form (no float copy), whose
        dequantised values have mean ~0 and standard deviation ~std (the full-size benches' random weights)."""

    def _slot(self, tensor: torch.Tensor, index: int | None) -> torch.Tensor:
        return tensor if index is None else tensor[index]


def int4_group(spec: WeightSpec, in_features: int) -> int:
    """The kernel group for a 4-bit spec: its own group, or for per-channel (and groups of 512, 1024...) the largest
    kernel group dividing it, with the scale repeated (exact)."""
    span = in_features if spec.group_size is None else spec.group_size
    for group in INT4_KERNEL_GROUPS:
        if span % group == 0 and in_features % group == 0:
            return group
    raise QuantizationError(f"group_size {spec.group_size} over {in_features} inputs is not supported for 4-bit "
                            f"weights: thinktalk's int4 kernels take groups of {', '.join(map(str, INT4_KERNEL_GROUPS))}"
                            f" (or per-channel on widths they divide)")


class Int4Matrices(QuantMatrices):
    def __init__(self, count, out_features, in_features, spec, dtype, layout):
        super().__init__(count, out_features, in_features, spec, dtype, layout)
        if in_features % 2 or (layout == "cpu" and out_features % 16):
            raise QuantizationError(f"a {out_features}x{in_features} matrix cannot be stored in 4 bits here (the "
                                    f"int4 kernels need an even input width and, on the CPU, rows in multiples of 16)")
        self.group = int4_group(spec, in_features)
        lead = self.lead()
        self.packed = _frozen(lead + (out_features, in_features // 2), torch.uint8)
        self.scale_zero = _frozen(lead + (in_features // self.group, out_features, 2), dtype)
        self.perm = _frozen(lead + (in_features,), torch.int64) if spec.act_order else None

    def matmul(self, x, index=None):
        if self.perm is not None:
            x = x.index_select(-1, self._slot(self.perm, index))
        packed, scale_zero = self._slot(self.packed, index), self._slot(self.scale_zero, index)
        if self.layout == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, self.group, scale_zero)
        from . import triton_kernels

        return triton_kernels.int4_matmul(x, packed, scale_zero, self.group)

    def dequantize(self, index=None):
        codes = int4_layout.unpack(self._slot(self.packed, index), self.layout).to(self.dtype)
        scale, offset = self._slot(self.scale_zero, index).unbind(-1)  # (K/g, N) each
        scale, offset = (t.t().repeat_interleave(self.group, dim=1) for t in (scale, offset))  # (N, K)
        w = (codes - INT4_MIDPOINT) * scale + offset
        if self.perm is None:
            return w
        restored = torch.empty_like(w)
        restored[:, self._slot(self.perm, index)] = w  # column j of w is input channel perm[j]
        return restored

    def random_(self, generator, std):
        # Every byte is two valid codes in either layout; uniform codes 0..15 have mean 7.5 and std ~4.61.
        self.packed.random_(0, 256, generator=generator)
        scale = std / UNIFORM_INT4_STD
        self.scale_zero[..., 0].fill_(scale)
        self.scale_zero[..., 1].fill_(0.5 * scale)  # (7.5 - 8) * scale + offset = 0
        if self.perm is not None:
            self.perm.copy_(torch.arange(self.in_features).expand_as(self.perm))

    def store(self, matrix, index=None):
        assert isinstance(matrix, IntMatrix) and matrix.bits == 4, matrix
        n, k = matrix.shape
        assert (n, k) == (self.out_features, self.in_features), ((n, k), (self.out_features, self.in_features))
        groups = matrix.group_index()
        perm = None
        if self.perm is not None:
            perm = torch.argsort(groups, stable=True)
            groups = groups[perm]
        # Each kernel group (self.group consecutive channels) must lie inside one of the matrix's groups, whose
        # (scale, zero) it then takes.
        tiles = groups.view(-1, self.group)
        if not bool((tiles == tiles[:, :1]).all()):
            raise QuantizationError(f"the groups of a {n}x{k} matrix (g_idx) are not {self.group} contiguous input "
                                    f"channels each, even after reordering; thinktalk cannot compute with them")
        source = groups[:: self.group]  # (K/g,) the matrix's group behind each kernel group
        scale, zero = matrix.scale[:, source].float(), matrix.zero[:, source].float()  # (N, K/g)
        offset = (INT4_MIDPOINT - zero) * scale  # (q - zero) * s == (q - 8) * s + (8 - zero) * s
        codes = matrix.q if perm is None else matrix.q[:, perm]
        with torch.no_grad():
            self._slot(self.packed, index).copy_(int4_layout.pack(codes.to(torch.uint8), self.layout))
            self._slot(self.scale_zero, index).copy_(torch.stack((scale.t(), offset.t()), dim=-1))
            if perm is not None:
                self._slot(self.perm, index).copy_(perm)


class Int8Matrices(QuantMatrices):
    def __init__(self, count, out_features, in_features, spec, dtype, layout):
        super().__init__(count, out_features, in_features, spec, dtype, layout)
        if spec.act_order:
            raise QuantizationError("act-order (g_idx) 8-bit weights are not supported; thinktalk reads act-order "
                                    "only for 4-bit weights")
        group = in_features if spec.group_size is None else spec.group_size
        if in_features % group:
            raise QuantizationError(f"group_size {group} does not divide the input width {in_features}")
        self.groups = in_features // group
        lead = self.lead()
        self.q = _frozen(lead + (out_features, in_features), torch.int8)
        self.scale = _frozen(lead + (out_features, self.groups), dtype)
        self.offset = None if spec.symmetric else _frozen(lead + (out_features, self.groups), dtype)

    def matmul(self, x, index=None):
        if self.groups > 1:
            return F.linear(x, self.dequantize(index))
        q, scale = self._slot(self.q, index), self._slot(self.scale, index)[:, 0]
        if self.layout == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale)
        else:
            from . import triton_kernels

            out = triton_kernels.int8_matmul(x, q, scale)
        if self.offset is not None:
            out = out + x.sum(-1, keepdim=True) * self._slot(self.offset, index)[:, 0]
        return out

    def dequantize(self, index=None):
        group = self.in_features // self.groups
        w = self._slot(self.q, index).to(self.dtype) * self._slot(self.scale, index).repeat_interleave(group, 1)
        if self.offset is not None:
            w = w + self._slot(self.offset, index).repeat_interleave(group, 1)
        return w

    def random_(self, generator, std):
        self.q.random_(-128, 128, generator=generator)  # uniform codes: mean -0.5, std ~73.9
        self.scale.fill_(std / UNIFORM_INT8_STD)
        if self.offset is not None:
            self.offset.fill_(0.5 * std / UNIFORM_INT8_STD)

    def store(self, matrix, index=None):
        assert isinstance(matrix, IntMatrix) and matrix.bits == 8, matrix
        assert matrix.group_of is None and matrix.groups == self.groups, (matrix.groups, self.groups)
        zero = matrix.zero.float() - INT8_MIDPOINT  # signed codes: (q - z) * s == (q' - z') * s
        if self.offset is None and bool((zero != 0).any()):
            raise QuantizationError("a symmetric 8-bit matrix has zero points other than 128")
        with torch.no_grad():
            self._slot(self.q, index).copy_((matrix.q.to(torch.int16) - INT8_MIDPOINT).to(torch.int8))
            self._slot(self.scale, index).copy_(matrix.scale)
            if self.offset is not None:
                self._slot(self.offset, index).copy_(-zero * matrix.scale.float())


class Fp8Matrices(QuantMatrices):
    def __init__(self, count, out_features, in_features, spec, dtype, layout):
        super().__init__(count, out_features, in_features, spec, dtype, layout)
        self.block_k = in_features if spec.block is None else spec.block[1]
        lead = self.lead()
        self.bits = _frozen(lead + (out_features, in_features), torch.uint8)  # float8_e4m3fn, viewed as bytes
        # In the model's dtype, as the reference's dequantisation rounds it (exact in float32).
        self.scale = _frozen(lead + (out_features, -(-in_features // self.block_k)), dtype)

    def matmul(self, x, index=None):
        if self.layout == "cpu":
            return F.linear(x, self.dequantize(index))
        from . import triton_kernels

        return triton_kernels.fp8_matmul(x, self._slot(self.bits, index), self._slot(self.scale, index),
                                         self.block_k)

    def dequantize(self, index=None):
        bits = self._slot(self.bits, index)
        scale = self._slot(self.scale, index).repeat_interleave(self.block_k, dim=1)[:, : self.in_features]
        return (fp8_e4m3_bits_to_half(bits).float() * (scale.float() * FP8_TO_HALF_SCALE)).to(self.dtype)

    def random_(self, generator, std):
        # N(0, 1) values as e4m3 (all finite), drawn one matrix at a time: one float temporary of one matrix.
        for matrix in self.bits.view(-1, self.out_features, self.in_features):
            draw = torch.empty(matrix.shape, device=matrix.device).normal_(generator=generator)
            matrix.copy_(draw.to(torch.float8_e4m3fn).view(torch.uint8))
        self.scale.fill_(std)

    def store(self, matrix, index=None):
        assert isinstance(matrix, Fp8Matrix) and matrix.block_k == self.block_k, matrix
        with torch.no_grad():
            self._slot(self.bits, index).copy_(matrix.weight.view(torch.uint8))
            self._slot(self.scale, index).copy_(matrix.scale)


def fp8_e4m3_bits_to_half(bits: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bit patterns -> float16 holding 2**-8 times their value, exactly (subnormals included: the 4-bit
    exponent and 3-bit mantissa placed in a float16's fields keep the same ratio, 2**-8, for every finite code)."""
    wide = bits.to(torch.int16)
    return (((wide << 8) & -32768) | ((wide << 7) & 0x3F80)).view(torch.float16)


FORMS = {"int4": Int4Matrices, "int8": Int8Matrices, "fp8": Fp8Matrices}


def matrices_for(spec: WeightSpec, count: int | None, out_features: int, in_features: int, dtype: torch.dtype,
                 device_type: str) -> QuantMatrices:
    form = FORMS["fp8" if spec.kind == "fp8" else f"int{spec.bits}"]
    return form(count, out_features, in_features, spec, dtype, "cpu" if device_type == "cpu" else "plain")
