"""compressed-tensors (`quant_method: "compressed-tensors"`): what llm-compressor writes, e.g. the public AWQ and
GPTQ Qwen3-Omni checkpoints. Facts from the format's own package (compressed_tensors 0.20).

    quantization_config: {"quant_method": "compressed-tensors", "format": "pack-quantized",
                          "quantization_status": "compressed",
                          "config_groups": {"group_0": {"targets": ["Linear"], "format": ...,
                              "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                                          "group_size": 32, "actorder": null, "block_structure": null, ...},
                              "input_activations": null}},
                          "ignore": ["lm_head", "re:.*mlp.gate$", ...]}

A module is quantized by the first group whose `targets` match it (the class name "Linear", an exact name, or "re:"
+ a regex matched from the start) and that `ignore` does not match (same rules). Formats per quantized linear:
    pack-quantized   weight_packed int32 (N, ceil(K * bits / 32)): signed codes + 2**(bits-1), code i of a row at
                     bits [bits * (i % per), ...) of word i // per (4 and 8 bits: no code straddles a word);
                     weight_scale (N, G); weight_zero_point (ceil(N * bits / 32), G) packed the same way along N
                     (asymmetric only); weight_shape int (2,) = [N, K]; weight_g_idx (K,) with group actorder.
                     w = (q - z) * scale, q and z signed.
    naive-quantized  weight int8 (N, K) signed codes; weight_scale; weight_zero_point int8 (N, G) when asymmetric.
    float-quantized  weight float8_e4m3fn (N, K); weight_scale: (1,) tensor, (N, 1) channel, or (ceil(N/bn),
                     ceil(K/bk)) block. Activation scales (input_scale) are read and not used: thinktalk computes
                     with the weights dequantised, in the model's dtype.
"""

from __future__ import annotations

import re

import torch

from ...config_reader import FieldReader
from ..decoded import Fp8Matrix, IntMatrix, fp8_block_scales_to_rows
from ..spec import INT_BITS, QuantizationError, WeightSpec, compile_patterns
from .base import (CONFIG_FIELD, FLOAT_DTYPES, Piece, WeightFormat, expect_dtype, module_aliases, packed_words,
                   unpack_int32)

INT_FORMATS = ("pack-quantized", "naive-quantized")
FLOAT_FORMATS = ("float-quantized",)
INT_STRATEGIES = ("group", "channel", "tensor")
FLOAT_STRATEGIES = ("channel", "tensor", "block")


def _matches(name: str, target: str) -> bool:
    """The package's rule (a "re:" regex matched from the start, else the exact name or the class name), plus a
    plain name matching as a dotted suffix: quantizers write "lm_head" for the thinker's `thinker.lm_head`."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear") or name.endswith("." + target)  # every module asked about is a linear


def _module_list(f: FieldReader, name: str, value) -> list[str]:
    """`targets` / `ignore`: module names, class names or "re:" patterns (their expressions checked here)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuantizationError(f"{f.where(name)} must be a list of module names or 're:' patterns, got {value!r}")
    compile_patterns([v[3:] for v in value if v.startswith("re:")], f.where(name))
    return value


class _Group:
    """One config group: its targets, its weights' spec and its on-disk format."""

    def __init__(self, f: FieldReader, default_format: str | None):
        self.where = f.prefix.rstrip(".")  # quantization_config.config_groups.<name>
        self.field = self.where.removeprefix(f"{CONFIG_FIELD}.")  # the same, as expect_dtype names fields
        self.targets = _module_list(f, "targets", f.raw("targets"))
        self.format = f.str("format", default_format)
        if self.format is None:
            raise f.fail("format", "is missing here and at the top level")
        w = f.sub("weights")
        self.kind = w.str("type", "int")
        self.bits = w.int("num_bits")
        self.strategy = w.str("strategy", "tensor")
        self.symmetric = w.bool("symmetric", True)
        self.actorder = w.raw("actorder", None)
        self.group_size = w.int("group_size", minimum=1) if self.strategy == "group" else None
        self.block = w.ints("block_structure", ()) if self.strategy == "block" else ()
        self.spec = self._spec(w)

    def _spec(self, w: FieldReader) -> WeightSpec:
        if self.kind == "float":
            if self.bits != 8 or self.format not in FLOAT_FORMATS or self.strategy not in FLOAT_STRATEGIES:
                raise QuantizationError(f"{w.where('')} float weights must be 8-bit float-quantized with strategy "
                                        f"{'/'.join(FLOAT_STRATEGIES)}; got {self.bits} bits, format "
                                        f"{self.format!r}, strategy {self.strategy!r}")
            if self.strategy == "block" and (len(self.block) != 2 or min(self.block) < 1):
                raise QuantizationError(f"{w.where('block_structure')} must be [rows, columns], got "
                                        f"{list(self.block)}")
            return WeightSpec("fp8", block=(self.block[0], self.block[1]) if self.strategy == "block" else None)
        if self.kind != "int":
            raise QuantizationError(f"{w.where('type')} must be 'int' or 'float', got {self.kind!r}")
        if self.bits not in INT_BITS:
            raise QuantizationError(f"{w.where('num_bits')}: {self.bits}-bit weights are not supported (thinktalk "
                                    f"computes with {' and '.join(map(str, INT_BITS))}-bit integer weights)")
        if self.format not in INT_FORMATS:
            raise QuantizationError(f"{self.where}.format: {self.format!r} is not supported for integer weights "
                                    f"(supported: {', '.join(INT_FORMATS)})")
        if self.strategy not in INT_STRATEGIES:
            raise QuantizationError(f"{w.where('strategy')}: {self.strategy!r} is not supported for integer "
                                    f"weights (supported: {', '.join(INT_STRATEGIES)})")
        if self.actorder not in (None, "static", "weight", "group"):
            raise QuantizationError(f"{w.where('actorder')}: {self.actorder!r} is not supported")
        return WeightSpec("int", bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                          act_order=self.actorder == "group")


class CompressedTensorsFormat(WeightFormat):
    method = "compressed-tensors"

    def __init__(self, f: FieldReader):
        status = f.str("quantization_status", "compressed")
        if status != "compressed":
            raise QuantizationError(f"{f.where('quantization_status')} must be 'compressed' (weights stored in "
                                    f"their quantized form), got {status!r}")
        default_format = f.str("format", None)
        groups = f.sub("config_groups")
        if not groups.data:
            raise groups.fail("", "must hold at least one group")
        self.groups = [_Group(groups.sub(name), default_format) for name in groups.data]
        self.ignore = _module_list(f, "ignore", f.raw("ignore", []))

    def describe(self) -> str:
        return "compressed-tensors (" + "; ".join(f"{g.format} {g.spec.describe()}" for g in self.groups) + ")"

    def _group(self, disk_name: str) -> _Group | None:
        names = module_aliases(disk_name)
        if any(_matches(n, i) for n in names for i in self.ignore if i != "Linear"):
            return None
        return next((g for g in self.groups if any(_matches(n, t) for n in names for t in g.targets)), None)

    def spec(self, disk_name, shape):
        group = self._group(disk_name)
        return None if group is None else group.spec

    def pieces(self, disk_name, spec, shape):
        group = self._group(disk_name)
        n, k = shape
        if group.kind == "float":  # the scale's shape depends on the strategy: checked by decode
            return {"weight": Piece((n, k)), "weight_scale": Piece(None), "input_scale": Piece(None, optional=True)}
        groups = self._scale_columns(group, n, k)
        pieces = {"weight_scale": Piece((n, groups) if group.strategy != "tensor" else None)}
        if group.format == "pack-quantized":
            pieces |= {"weight_packed": Piece((n, packed_words(k, group.bits))), "weight_shape": Piece((2,))}
            if not group.symmetric:
                pieces["weight_zero_point"] = Piece((packed_words(n, group.bits), groups))
        else:
            pieces["weight"] = Piece((n, k))
            if not group.symmetric:
                pieces["weight_zero_point"] = Piece((n, groups))
        if spec.act_order:
            pieces["weight_g_idx"] = Piece((k,))
        return pieces

    @staticmethod
    def _scale_columns(group: _Group, n: int, k: int) -> int:
        if group.strategy == "group":
            if k % group.group_size:
                raise QuantizationError(f"{group.where}.weights.group_size {group.group_size} does "
                                        f"not divide the input width {k}")
            return k // group.group_size
        return 1

    def decode(self, disk_name, spec, shape, tensors):
        group = self._group(disk_name)
        if group.kind == "float":
            return self._decode_float(disk_name, group, shape, tensors)
        return self._decode_int(disk_name, group, shape, tensors)

    def _decode_int(self, name: str, group: _Group, shape, tensors) -> IntMatrix:
        n, k = shape
        half = 2 ** (group.bits - 1)
        scale = tensors["weight_scale"]
        expect_dtype(f"{name}.weight_scale", scale, FLOAT_DTYPES, f"{group.field}.weights")
        scale = scale.float().reshape(-1, 1).expand(n, 1) if group.strategy == "tensor" else scale.float()
        if group.format == "pack-quantized":
            packed = tensors["weight_packed"]
            expect_dtype(f"{name}.weight_packed", packed, (torch.int32,), f"{group.field}.format")
            stored = [int(v) for v in tensors["weight_shape"].tolist()]
            if stored != [n, k]:
                raise QuantizationError(f"tensor {name}.weight_shape says {stored}, but the model's {name} is "
                                        f"[{n}, {k}]")
            q = unpack_int32(packed, group.bits, k, dim=1)  # unsigned: signed code + half
        else:
            weight = tensors["weight"]
            expect_dtype(f"{name}.weight", weight, (torch.int8,), f"{group.field}.format")
            q = weight.to(torch.int32) + half
        zero = torch.full_like(scale, float(half))
        if not group.symmetric:
            stored_zero = tensors["weight_zero_point"]
            if group.format == "pack-quantized":
                expect_dtype(f"{name}.weight_zero_point", stored_zero, (torch.int32,), f"{group.field}.format")
                zero = unpack_int32(stored_zero, group.bits, n, dim=0).float()  # (N, G), signed + half
            else:
                zero = stored_zero.float() + half
        group_of = None
        if "weight_g_idx" in tensors:
            group_of = tensors["weight_g_idx"].long()
            if int(group_of.min()) < 0 or int(group_of.max()) >= scale.shape[1]:
                raise QuantizationError(f"tensor {name}.weight_g_idx names groups outside [0, {scale.shape[1]})")
        return IntMatrix(q, scale, zero, group.bits, group_of)

    def _decode_float(self, name: str, group: _Group, shape, tensors) -> Fp8Matrix:
        n, k = shape
        weight, scale = tensors["weight"], tensors["weight_scale"].float()
        if weight.dtype != torch.float8_e4m3fn:
            raise QuantizationError(f"tensor {name}.weight has dtype {weight.dtype}, but {group.where} "
                                    f"quantizes {name} as float8_e4m3fn")
        if group.strategy == "block":
            rows, cols = group.block
            expected = (-(-n // rows), -(-k // cols))
            if tuple(scale.shape) != expected:
                raise QuantizationError(f"tensor {name}.weight_scale has shape {list(scale.shape)}, expected "
                                        f"{list(expected)} ({rows}x{cols} blocks)")
            return Fp8Matrix(weight, fp8_block_scales_to_rows(scale, rows, n), cols)
        if scale.numel() not in ((1,) if group.strategy == "tensor" else (n,)):
            raise QuantizationError(f"tensor {name}.weight_scale has shape {list(scale.shape)}, expected one scale "
                                    f"{'in all' if group.strategy == 'tensor' else 'per output row'}")
        return Fp8Matrix(weight, scale.reshape(-1, 1).expand(n, 1).contiguous(), k)
