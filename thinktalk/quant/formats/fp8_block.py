"""Block-wise FP8 (`quant_method: "fp8"`): the public FP8 Qwen3-Omni checkpoints' layout (transformers' fine-grained
FP8, as DeepSeek-V3 introduced it).

    quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [128, 128], "modules_to_not_convert": [...]}
    per quantized linear: weight            float8_e4m3fn (N, K)
                          weight_scale_inv  float32 (ceil(N / 128), ceil(K / 128))    w = weight * scale_inv

Every linear is quantized except those `modules_to_not_convert` names (transformers' matching rule: a prefix up to a
module boundary, as a regular expression, or a suffix). Activations are not quantized by thinktalk: it computes with
the dequantised weights in the model's dtype, which is what "dynamic" activation scaling approximates.
"""

from __future__ import annotations

import torch

from ...config_reader import FieldReader
from ..decoded import Fp8Matrix, fp8_block_scales_to_rows
from ..spec import QuantizationError, WeightSpec
from .base import CONFIG_FIELD, Piece, WeightFormat, expect_dtype, matches_module, module_aliases


class Fp8BlockFormat(WeightFormat):
    method = "fp8"

    def __init__(self, f: FieldReader):
        fmt = f.str("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"{f.where('fmt')} must be 'e4m3' (float8_e4m3fn weights), got {fmt!r}")
        scheme = f.str("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise QuantizationError(f"{f.where('activation_scheme')} must be 'dynamic' (static activation scales are "
                                    f"not supported), got {scheme!r}")
        block = f.ints("weight_block_size", ())
        if len(block) != 2 or min(block) < 1:
            raise QuantizationError(f"{f.where('weight_block_size')} must be two positive sizes [rows, columns], got "
                                    f"{list(block)}")
        self.block = (block[0], block[1])
        skip = f.raw("modules_to_not_convert", [])
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise QuantizationError(f"{f.where('modules_to_not_convert')} must be a list of module names, got "
                                    f"{skip!r}")
        self.skip = skip

    def describe(self) -> str:
        return f"fp8 (e4m3, {self.block[0]}x{self.block[1]} blocks)"

    def spec(self, disk_name, shape):
        if matches_module(self.skip, module_aliases(disk_name)):
            return None
        return WeightSpec("fp8", block=self.block)

    def pieces(self, disk_name, spec, shape):
        n, k = shape
        rows, cols = self.block
        return {"weight": Piece((n, k)), "weight_scale_inv": Piece((-(-n // rows), -(-k // cols)))}

    def decode(self, disk_name, spec, shape, tensors):
        weight, scale = tensors["weight"], tensors["weight_scale_inv"]
        if weight.dtype != torch.float8_e4m3fn:
            raise QuantizationError(f"tensor {disk_name}.weight has dtype {weight.dtype}, but {CONFIG_FIELD}."
                                    f"quant_method 'fp8' quantizes {disk_name} (not in modules_to_not_convert), so "
                                    f"it must be float8_e4m3fn")
        expect_dtype(f"{disk_name}.weight_scale_inv", scale, (torch.float32, torch.bfloat16), "weight_block_size")
        return Fp8Matrix(weight, fp8_block_scales_to_rows(scale, self.block[0], shape[0]), self.block[1])
