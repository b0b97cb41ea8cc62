"""Quantized weights: checkpoints stored quantized (FP8 blocks, compressed-tensors, GPTQ / AutoRound), quantize on
load (int8, int4, fp8), and the kernels that compute from the stored form.

    spec.py         WeightSpec (one matrix's stored form) and QuantPlan (which modules), QuantizeOnLoad
    decoded.py      IntMatrix / Fp8Matrix: what every format decodes into; the round-to-nearest quantizers
    int4_layout.py  where 4-bit codes sit in bytes, per kernel
    matrices.py     Int4/Int8/Fp8Matrices: stored forms with their products (CPU torch kernels, CUDA Triton)
    modules.py      QuantLinear, QuantExperts and quantize_modules (replaces modules on the meta device)
    formats/        reading each checkpoint format's quantization_config and tensors
    loading.py      QuantSources: matrices assembled from their on-disk pieces while the checkpoint streams
    sizes.py        bytes per precision, for `thinktalk info` and the memory planner
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import OmniConfig
from .formats import checkpoint_format, plan_for
from .formats.base import MatrixReader
from .loading import QuantSources
from .modules import quantize_modules
from .on_load import OnLoadReader
from .spec import DEFAULT_QUANTIZED_MODULES, QuantizationError, QuantizeOnLoad, QuantPlan, WeightSpec

__all__ = ["DEFAULT_QUANTIZED_MODULES", "Quantization", "QuantizationError", "QuantizeOnLoad", "WeightSpec",
           "quantization_for"]


@dataclass
class Quantization:
    """How a model is quantized: which modules (plan) and how their matrices are read (reader)."""

    plan: QuantPlan
    reader: MatrixReader
    chosen: dict[str, WeightSpec] | None = None  # module -> spec, once applied

    def apply(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        """On the meta-device model: replace the quantized modules by their stand-ins for `device`."""
        self.chosen = quantize_modules(model, self.plan, dtype, device.type)

    def sources(self, model: nn.Module, device: torch.device) -> QuantSources:
        return QuantSources(model, self.reader, device)

    def describe(self) -> str:
        kinds = sorted({spec.describe() for spec in (self.chosen or {}).values()})
        return f"{self.reader.describe()}: {len(self.chosen or {})} modules ({'; '.join(kinds) or 'none'})"


def quantization_for(cfg: OmniConfig, config_file: Path | str,
                     quantize: str | QuantizeOnLoad | None) -> Quantization | None:
    """The checkpoint's own quantization, or quantize on load when asked (`quantize`: "int8" / "int4" / "fp8" or a
    QuantizeOnLoad); None for a float checkpoint loaded as it is."""
    if cfg.quantization is not None:
        if quantize is not None:
            raise QuantizationError(f"{config_file}: the checkpoint is already quantized (quantization_config."
                                    f"quant_method {cfg.quantization.method!r}); load it without quantize=")
        fmt = checkpoint_format(cfg.quantization, config_file)
        return Quantization(plan_for(fmt), fmt)
    if quantize is None:
        return None
    options = quantize if isinstance(quantize, QuantizeOnLoad) else QuantizeOnLoad(quantize)
    return Quantization(options.plan(), OnLoadReader(options))
