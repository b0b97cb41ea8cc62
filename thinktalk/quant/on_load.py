"""Quantize on load: a float checkpoint's matrices rounded to nearest as they stream from disk (QuantizeOnLoad)."""

from __future__ import annotations

import torch

from .decoded import Fp8Matrix, IntMatrix, quantize_fp8, quantize_int
from .formats.base import MatrixReader, Piece
from .spec import QuantizationError, QuantizeOnLoad


class OnLoadReader(MatrixReader):
    """Each quantized matrix is its on-disk float `.weight`, quantized (on the target device) when it arrives."""

    def __init__(self, options: QuantizeOnLoad):
        self.options = options
        self.method = f"{options.precision} on load"

    def describe(self) -> str:
        return self.method

    def pieces(self, disk_name, spec, shape):
        return {"weight": Piece(shape)}

    def decode(self, disk_name, spec, shape, tensors) -> IntMatrix | Fp8Matrix:
        weight = tensors["weight"]
        if not weight.is_floating_point() or weight.dtype == torch.float8_e4m3fn:
            raise QuantizationError(f"tensor {disk_name}.weight has dtype {weight.dtype}: quantize on load needs a "
                                    f"float checkpoint")
        if spec.kind == "fp8":
            return quantize_fp8(weight, spec.block)
        return quantize_int(weight, spec.bits, spec.group_size, spec.symmetric)

