"""Quantized checkpoint formats, detected from `config.json`'s `quantization_config`."""

from __future__ import annotations

from pathlib import Path

from ...config import QuantizationSection
from ...config_reader import FieldReader
from ..spec import QuantizationError
from .base import CONFIG_FIELD, WeightFormat, plan_for
from .compressed_tensors import CompressedTensorsFormat
from .fp8_block import Fp8BlockFormat
from .gptq import GptqFormat

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "gptq", "auto-round")

__all__ = ["CONFIG_FIELD", "SUPPORTED_METHODS", "WeightFormat", "checkpoint_format", "plan_for"]


def checkpoint_format(section: QuantizationSection, file: Path | str = "config.json") -> WeightFormat:
    """The reader of the format a checkpoint's `quantization_config` declares."""
    f = FieldReader(section.fields, file, f"{CONFIG_FIELD}.")
    method = section.method
    if method == "fp8":
        return Fp8BlockFormat(f)
    if method == "compressed-tensors":
        return CompressedTensorsFormat(f)
    if method in ("gptq", "auto-round"):
        return GptqFormat(f, method)
    raise QuantizationError(f"{f.where('quant_method')}: {method!r} is not supported (supported: "
                            f"{', '.join(SUPPORTED_METHODS)})")
