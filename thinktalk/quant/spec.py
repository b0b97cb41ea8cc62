"""What a quantized matrix is, and which of the model's matrices are quantized.

A `WeightSpec` describes one matrix's stored form, whatever the checkpoint format it came from:

    int   w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]      q, zero unsigned `bits`-bit integers, g = k's group
    fp8   w[n, k] = e4m3[n, k] * scale[n // block_n, k // block_k]

`group_size` None means one group per output row (per channel). `act_order` means the groups are not contiguous
along k (GPTQ's desc_act: a `g_idx` per input channel); thinktalk permutes the input channels once at load so that
they are, and permutes the activations to match at run time (exact).

A `QuantPlan` says, for each quantizable module of thinktalk's model (named as its state_dict names it, e.g.
`thinker.model.layers.3.self_attn.q_proj` or `thinker.model.layers.3.mlp.experts`), which spec it has, or None to
keep it in the model's float dtype. Checkpoint formats build a plan from their `quantization_config`; quantize on
load builds one from `QuantizeOnLoad`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..weights import CheckpointError

INT_BITS = (4, 8)  # the integer widths thinktalk computes with
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels take (per-channel maps onto one of them)
FP8_BLOCK = (128, 128)  # the public FP8 checkpoints' block


class QuantizationError(CheckpointError):
    """A quantized checkpoint (or a quantize-on-load request) that thinktalk cannot load; names the field/tensor."""


@dataclass(frozen=True)
class WeightSpec:
    kind: str  # "int" or "fp8"
    bits: int = 8
    group_size: int | None = None  # int: inputs per scale (None: per output channel)
    symmetric: bool = True  # int: zero fixed at 2**(bits-1) (no zero tensor on disk)
    act_order: bool = False  # int: groups given by a per-input g_idx, not contiguous
    block: tuple[int, int] | None = None  # fp8: (rows, cols) per scale; None: one scale per output channel

    def __post_init__(self):
        assert self.kind in ("int", "fp8"), self.kind
        assert self.kind != "int" or self.bits in INT_BITS, self.bits

    def describe(self) -> str:
        if self.kind == "fp8":
            return f"fp8 e4m3, {'block %dx%d' % self.block if self.block else 'per-channel'} scales"
        group = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"int{self.bits} {group}, {'symmetric' if self.symmetric else 'asymmetric'}" + \
            (", act-order" if self.act_order else "")


# The default selection, as regular expressions over thinktalk's module names: the thinker's and the talker's
# attention projections and MoE experts (the talker's shared expert included). Everything else (the audio and
# vision encoders, Code2Wav, embeddings, lm_head / codec_head, routers, the code predictor, norms) stays in the
# model's float dtype: together they are 2.3 B of the released model's 35.3 B parameters, and they are what the
# public quantized checkpoints keep in bf16 too.
DEFAULT_QUANTIZED_MODULES = (
    r"(thinker|talker)\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"(thinker|talker)\.model\.layers\.\d+\.mlp\.experts",
    r"talker\.model\.layers\.\d+\.mlp\.shared_expert\.(gate|up|down)_proj",
)


@dataclass(frozen=True)
class QuantPlan:
    """Which modules are quantized, and how. `spec_for(name)` is the one question loading asks."""

    method: str  # what produced it: "fp8", "compressed-tensors", "gptq", "auto-round", or "int4 on load", ...
    # (module name, matrix, in_features) -> spec; matrix: "weight" for a linear, "gate_up_proj" / "down_proj" for
    # the two stacked matrices of fused experts
    rule: Callable[[str, str, int], WeightSpec | None] = field(compare=False)

    def spec_for(self, module_name: str, matrix: str, in_features: int) -> WeightSpec | None:
        return self.rule(module_name, matrix, in_features)


def compile_patterns(patterns: tuple[str, ...] | list[str], what: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise QuantizationError(f"{what}: {pattern!r} is not a valid regular expression ({error})") from None
    return compiled


@dataclass(frozen=True)
class QuantizeOnLoad:
    """Quantize a float checkpoint tensor by tensor as it streams from disk (round to nearest).

    precision: "int8" (per-channel, symmetric), "int4" (asymmetric, `group_size` inputs per scale; a module
    whose width the group does not divide takes the largest of 128/64/32 that does, or stays float when none
    does) or "fp8" (e4m3 with one scale per 128x128 block). `modules`: regular expressions, matched in full
    against thinktalk's module names, selecting what is quantized (default: DEFAULT_QUANTIZED_MODULES).
    """

    precision: str
    group_size: int = 128
    modules: tuple[str, ...] = DEFAULT_QUANTIZED_MODULES

    PRECISIONS = ("int8", "int4", "fp8")

    def __post_init__(self):
        if self.precision not in self.PRECISIONS:
            raise QuantizationError(f"quantize={self.precision!r} is not supported; use one of "
                                    f"{', '.join(self.PRECISIONS)}")
        if self.group_size not in INT4_KERNEL_GROUPS:
            raise QuantizationError(f"group_size {self.group_size} is not supported for int4; use one of "
                                    f"{', '.join(map(str, INT4_KERNEL_GROUPS))}")
        compile_patterns(self.modules, "quantize modules")

    def spec(self, in_features: int) -> WeightSpec | None:
        if self.precision == "int8":
            return WeightSpec("int", bits=8, group_size=None, symmetric=True)
        if self.precision == "fp8":
            return WeightSpec("fp8", block=FP8_BLOCK)
        for group in (self.group_size,) + tuple(g for g in INT4_KERNEL_GROUPS if g < self.group_size):
            if in_features % group == 0:
                return WeightSpec("int", bits=4, group_size=group, symmetric=False)
        return None

    def plan(self) -> QuantPlan:
        patterns = compile_patterns(self.modules, "quantize modules")

        def rule(name: str, matrix: str, in_features: int) -> WeightSpec | None:
            if not any(p.fullmatch(name) for p in patterns):
                return None
            return self.spec(in_features)

        return QuantPlan(f"{self.precision} on load", rule)
