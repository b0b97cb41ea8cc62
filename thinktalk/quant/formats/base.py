"""What every quantized-weight format tells the loader: which matrices it quantizes, and how to read one.

A format reads its part of `config.json` (`quantization_config`) once and then answers, for an on-disk linear
layer named as the checkpoint names it (`thinker.model.layers.0.self_attn.q_proj`,
`thinker.model.layers.0.mlp.experts.7.gate_proj`):
    spec(disk_name, shape)    the WeightSpec it is stored with, or None when it is kept in float
    pieces(disk_name, ...)    the tensors holding it ({suffix: expected shape}), e.g. weight_packed, weight_scale
    decode(disk_name, ...)    those tensors -> an IntMatrix / Fp8Matrix (quant/decoded.py)
Errors name the tensor and the config field (`QuantizationError`).

`plan_for(format)` turns a format into the QuantPlan the model is built with: a thinktalk linear is its on-disk
linear; fused experts are expert 0's on-disk linears (gate_proj and up_proj must agree); every other expert is
checked against that as it loads (a missing piece is a missing tensor).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..decoded import Fp8Matrix, IntMatrix
from ..spec import QuantizationError, QuantPlan, WeightSpec

CONFIG_FIELD = "quantization_config"
# Fused experts: thinktalk matrix -> the on-disk linears of one expert that form it, in row order.
EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class Piece:
    shape: tuple[int, ...] | None  # None: any shape (checked by decode)
    optional: bool = False


class MatrixReader(ABC):
    """How the tensors of one on-disk linear become a decoded matrix."""

    method: str

    @abstractmethod
    def pieces(self, disk_name: str, spec: WeightSpec, shape: tuple[int, int]) -> dict[str, Piece]:
        """The tensors `{disk_name}.{suffix}` that hold one quantized matrix (a bias is loaded as in float)."""

    @abstractmethod
    def decode(self, disk_name: str, spec: WeightSpec, shape: tuple[int, int],
               tensors: dict[str, torch.Tensor]) -> IntMatrix | Fp8Matrix:
        """The pieces (present optional ones included) -> the matrix."""

    def check_spec(self, disk_name: str, spec: WeightSpec, shape: tuple[int, int]) -> None:
        """Raise when `disk_name` is not stored as `spec` (the spec the fused matrix it joins was built with)."""

    def describe(self) -> str:
        return self.method


class WeightFormat(MatrixReader):
    """A checkpoint format: also says which linears it quantizes."""

    method: str  # quant_method as the config spells it

    @abstractmethod
    def spec(self, disk_name: str, shape: tuple[int, int]) -> WeightSpec | None:
        """How the on-disk linear `disk_name` of (out, in) = shape is stored; None: in float (`.weight`)."""

    def check_spec(self, disk_name, spec, shape):
        found = self.spec(disk_name, shape)
        if found != spec:
            raise QuantizationError(f"{CONFIG_FIELD}: {disk_name} is stored as {_describe(found)}, but the experts it "
                                    f"is fused with as {spec.describe()}; thinktalk stores fused experts in one form")


def expert_disk_names(module: str, matrix: str, expert: int) -> list[str]:
    return [f"{module}.{expert}.{part}" for part in EXPERT_PARTS[matrix]]


def plan_for(fmt: WeightFormat) -> QuantPlan:
    """The plan a checkpoint in `fmt` builds the model with (specs depend on names and input widths only)."""

    def rule(module: str, matrix: str, in_features: int) -> WeightSpec | None:
        if matrix == "weight":
            return fmt.spec(module, (0, in_features))
        specs = {name: fmt.spec(name, (0, in_features)) for name in expert_disk_names(module, matrix, 0)}
        if len(set(specs.values())) != 1:
            raise QuantizationError(f"{CONFIG_FIELD}: the linears {', '.join(specs)} form one fused matrix in "
                                    f"thinktalk but are stored differently ({', '.join(map(_describe, specs.values()))})")
        return next(iter(specs.values()))

    return QuantPlan(fmt.method, rule)


def _describe(spec: WeightSpec | None) -> str:
    return "float" if spec is None else spec.describe()


# ----------------------------------------------------------------------------------------------------------------
# Shared reading helpers


def expect_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...], field: str) -> None:
    if tensor.dtype not in allowed:
        raise QuantizationError(f"tensor {name} has dtype {tensor.dtype}, but {CONFIG_FIELD}.{field} needs "
                                f"{' or '.join(str(d) for d in allowed)}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unpack_int32(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Codes packed little-end first into int32 words along `dim` (32 // bits per word) -> int32 codes, `count`
    along that dim. GPTQ packs qweight along the input dim and qzeros along the output dim this way;
    compressed-tensors packs along the input dim (and zero points along the output dim)."""
    per_word = 32 // bits
    moved = words.movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    codes = (moved.unsqueeze(-1) >> shifts) & (2 ** bits - 1)  # (..., words, per_word)
    codes = codes.flatten(-2)[..., :count]
    assert codes.shape[-1] == count, (codes.shape, count)
    return codes.movedim(-1, dim).contiguous()


def packed_words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def matches_module(patterns: list[str], names: list[str]) -> bool:
    """transformers' rule for `modules_to_not_convert`-style lists: a pattern matches a module name from its start up
    to a module boundary (as a regular expression), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        for name in names:
            try:
                if re.match(rf"(?:{pattern}){boundary}", name) or name.endswith(pattern):
                    return True
            except re.error:
                if name.endswith(pattern) or name.startswith(pattern + "."):
                    return True
    return False


def module_aliases(disk_name: str) -> list[str]:
    """The names a quantizer may have used for an on-disk module: the on-disk name, and transformers' in-memory
    name of the thinker's language model (thinker.model -> thinker.model.language_model)."""
    names = [disk_name]
    if disk_name.startswith("thinker.model."):
        names.append("thinker.model.language_model." + disk_name[len("thinker.model."):])
    return names
