"""How many bytes a checkpoint's model takes in each precision, counted on the meta device (nothing allocated).

    bfloat16  every parameter in bf16
    fp8       the default quantized modules (spec.DEFAULT_QUANTIZED_MODULES) as e4m3 + one bf16 scale per 128 inputs
    int8      ... as int8 + one bf16 scale per output channel
    int4      ... as 4-bit codes + a bf16 (scale, offset) pair per 128 inputs
    (the rest in bf16 in every row)

The counts are those of the stored forms in quant/matrices.py, so they are what the weights occupy once loaded (the
memory planner takes them as `weights_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OmniConfig
from .modules import quantize_modules
from .spec import QuantizeOnLoad

PRECISIONS = ("bfloat16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class ModelBytes:
    total: int
    by_part: dict[str, int]  # "thinker", "talker", "code2wav" -> bytes

    def gib(self) -> float:
        return self.total / 2**30


def model_bytes(cfg: OmniConfig, precision: str, dtype: torch.dtype = torch.bfloat16,
                audio_output: bool | None = None, options: QuantizeOnLoad | None = None) -> ModelBytes:
    """Bytes of the whole model (thinker, and talker + code2wav when it speaks) in `precision` ("bfloat16" or one of
    QuantizeOnLoad.PRECISIONS, or `options` for another module selection / group size)."""
    from ..models.omni import OmniModel

    speak = cfg.has_audio_output if audio_output is None else audio_output
    with torch.device("meta"):
        model = OmniModel(cfg, audio_output=speak).to(dtype)
    if precision != "bfloat16" or options is not None:
        options = options or QuantizeOnLoad(precision)
        quantize_modules(model, options.plan(), dtype, "cuda")  # sizes do not depend on the kernel's layout
    by_part = {}
    for part in ("thinker", "talker", "code2wav"):
        module = getattr(model, part)
        if module is not None:
            by_part[part] = sum(p.numel() * p.element_size() for p in module.parameters())
    return ModelBytes(sum(by_part.values()), by_part)
