"""GPTQ and AutoRound (`quant_method: "gptq"` / `"auto-round"`): the AutoGPTQ / GPTQModel tensor layout.

    quantization_config: {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
                          "checkpoint_format": "gptq", "block_name_to_quantize": "thinker.model.layers", ...}
                         {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": true,
                          "packing_format": "auto_round:auto_gptq", "block_name_to_quantize": [...],
                          "extra_config": {module: {"bits": 16, ...}}}
    per quantized linear (K inputs, N outputs, G = K / group_size groups, per = 32 / bits codes a word):
        qweight int32 (K / per, N)   codes packed along the INPUT dim, code i at bits [bits * (i % per), ...)
        qzeros  int32 (G, N / per)   zero points packed along the OUTPUT dim, stored minus one ("gptq" v1 layout,
                                     AutoGPTQ and auto-round's "auto_round:auto_gptq") or as they are ("gptq_v2",
                                     GPTQModel, auto-round's "auto_round" and "auto_round:gptqmodel")
        scales  float16 (G, N)
        g_idx   int32 (K,)           group of each input channel (k // group_size unless desc_act)
        w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

Which linears are quantized: every linear under `block_name_to_quantize` (default: the thinker's decoder layers,
the released checkpoints' `thinker.model.layers`), except the one-output shared-expert gate (no GPTQ tool
quantizes it), `modules_to_not_convert`, GPTQModel's `dynamic` entries starting "-:" and auto-round's `extra_config`
entries of 16 bits or more. `dynamic` "+:" entries and `extra_config` may change bits / group_size / sym per module.
`lm_head: true` adds the thinker's lm_head.
"""

from __future__ import annotations

import re

import torch

from ...config_reader import FieldReader
from ..decoded import IntMatrix
from ..spec import INT_BITS, QuantizationError, WeightSpec, compile_patterns
from .base import (CONFIG_FIELD, Piece, WeightFormat, expect_dtype, matches_module, module_aliases, packed_words,
                   unpack_int32)

DEFAULT_BLOCKS = ("thinker.model.layers",)
NEVER_QUANTIZED = ("mlp.shared_expert_gate",)  # (hidden -> 1) gates: GPTQ tools leave them in float
V1_FORMATS = {"gptq", "auto_round:auto_gptq", "auto_round:gptq"}  # qzeros stored minus one
V2_FORMATS = {"gptq_v2", "auto_round", "auto_round:gptqmodel"}
FLOAT_BITS = 16  # an extra_config / dynamic override of this many bits keeps the module in float


class GptqFormat(WeightFormat):
    def __init__(self, f: FieldReader, method: str):
        self.method, self.where = method, f.prefix.rstrip(".")
        self.base = self._settings(f, "")
        layout_field = "packing_format" if method == "auto-round" else "checkpoint_format"
        layout = f.str(layout_field, "auto_round:auto_gptq" if method == "auto-round" else "gptq")
        if layout not in V1_FORMATS | V2_FORMATS:
            raise QuantizationError(f"{f.where(layout_field)}: {layout!r} is not supported (supported: "
                                    f"{', '.join(sorted(V1_FORMATS | V2_FORMATS))}; AWQ-packed files are not)")
        self.zero_offset = 1 if layout in V1_FORMATS else 0
        blocks = f.raw("block_name_to_quantize", None) or f.raw("to_quant_block_names", None) or list(DEFAULT_BLOCKS)
        blocks = [blocks] if isinstance(blocks, str) else blocks
        if not isinstance(blocks, list) or not all(isinstance(b, (str, list)) for b in blocks):
            raise f.fail("block_name_to_quantize", f"must be a name or a list of names, got {blocks!r}")
        self.blocks = [b for item in blocks for b in ([item] if isinstance(item, str) else item)]
        self.blocks = [n.strip() for b in self.blocks for n in b.split(",") if n.strip()]
        self.skip = f.raw("modules_to_not_convert", None) or []
        if not isinstance(self.skip, list) or not all(isinstance(s, str) for s in self.skip):
            raise QuantizationError(f"{f.where('modules_to_not_convert')} must be a list of module names, got "
                                    f"{self.skip!r}")
        self.lm_head = f.bool("lm_head", False)
        self.overrides = self._overrides(f)

    def _settings(self, f: FieldReader, where: str, base: dict | None = None) -> dict:
        override, base = base is not None, base or {}
        bits = f.int("bits", base.get("bits", 4))
        group = f.int("group_size", base.get("group_size", 128))
        sym = f.bool("sym", base.get("sym", True))
        act_order = f.bool("desc_act", base.get("desc_act", False))
        if bits not in INT_BITS and not (override and bits >= FLOAT_BITS):
            raise QuantizationError(f"{f.where('bits')}{where}: {bits}-bit weights are not supported (thinktalk "
                                    f"computes with {' and '.join(map(str, INT_BITS))}-bit integer weights)")
        if group != -1 and group < 1:
            raise QuantizationError(f"{f.where('group_size')}{where} must be -1 (per channel) or positive, got "
                                    f"{group}")
        return dict(bits=bits, group_size=group, sym=sym, desc_act=act_order)

    def _overrides(self, f: FieldReader) -> list[tuple[re.Pattern | str, dict | None]]:
        """(pattern or exact name, settings or None for 'kept in float'), in config order."""
        found: list[tuple[re.Pattern | str, dict | None]] = []
        dynamic = f.raw("dynamic", None) or {}
        if not isinstance(dynamic, dict):
            raise QuantizationError(f"{f.where('dynamic')} must map module patterns to settings, got {dynamic!r}")
        for key, value in dynamic.items():
            negative, pattern = key.startswith("-:"), re.sub(r"^[+-]:", "", key)
            pattern = pattern[3:] if pattern.startswith("re:") else pattern
            settings = None if negative else self._settings(FieldReader(value or {}, f.file, f"{f.prefix}dynamic."
                                                                        f"{key}."), "", self.base)
            if settings is not None and settings["bits"] >= FLOAT_BITS:
                settings = None
            found.append((compile_patterns([pattern], f"{f.where('dynamic')} key {key!r}")[0], settings))
        extra = f.raw("extra_config", None) or {}
        if not isinstance(extra, dict):
            raise QuantizationError(f"{f.where('extra_config')} must map module names to settings, got {extra!r}")
        for name, value in extra.items():
            settings = self._settings(FieldReader(value or {}, f.file, f"{f.prefix}extra_config.{name}."), "",
                                      self.base)
            found.append((name, None if settings["bits"] >= FLOAT_BITS else settings))
        return found

    def describe(self) -> str:
        b = self.base
        group = "per-channel" if b["group_size"] == -1 else f"group {b['group_size']}"
        return f"{self.method} ({b['bits']}-bit, {group}, {'sym' if b['sym'] else 'asym'}" + \
            (", desc_act" if b["desc_act"] else "") + ")"

    def _settings_for(self, disk_name: str) -> dict | None:
        names = module_aliases(disk_name)
        in_blocks = any(n.startswith(b + ".") for n in names for b in self.blocks)
        if not (in_blocks or (self.lm_head and disk_name == "thinker.lm_head")):
            return None
        if disk_name.endswith(NEVER_QUANTIZED) or matches_module(self.skip, names):
            return None
        settings = self.base
        for pattern, override in self.overrides:
            hit = any(pattern.match(n) for n in names) if isinstance(pattern, re.Pattern) else pattern in names
            if hit:
                settings = override
        return settings

    def spec(self, disk_name, shape):
        s = self._settings_for(disk_name)
        if s is None:
            return None
        group = None if s["group_size"] == -1 else s["group_size"]
        return WeightSpec("int", bits=s["bits"], group_size=group, symmetric=s["sym"], act_order=s["desc_act"])

    def pieces(self, disk_name, spec, shape):
        n, k = shape
        group = k if spec.group_size is None else spec.group_size
        if k % group:
            raise QuantizationError(f"{CONFIG_FIELD}.group_size {group} does not divide the input width {k} of "
                                    f"{disk_name}")
        groups = k // group
        return {"qweight": Piece((packed_words(k, spec.bits), n)), "qzeros": Piece((groups, packed_words(n, spec.bits))),
                "scales": Piece((groups, n)), "g_idx": Piece((k,), optional=not spec.act_order)}

    def decode(self, disk_name, spec, shape, tensors):
        n, k = shape
        for piece in ("qweight", "qzeros"):
            expect_dtype(f"{disk_name}.{piece}", tensors[piece], (torch.int32,), "bits")
        scales = tensors["scales"]
        expect_dtype(f"{disk_name}.scales", scales, (torch.float16, torch.bfloat16, torch.float32), "bits")
        q = unpack_int32(tensors["qweight"], spec.bits, k, dim=0).t()  # (N, K)
        zero = unpack_int32(tensors["qzeros"], spec.bits, n, dim=1).t().float() + self.zero_offset  # (N, G)
        group_of = None
        if "g_idx" in tensors:
            group_of = tensors["g_idx"].long()
            if int(group_of.min()) < 0 or int(group_of.max()) >= scales.shape[0]:
                raise QuantizationError(f"tensor {disk_name}.g_idx names groups outside [0, {scales.shape[0]})")
            contiguous = torch.arange(k) // (k // scales.shape[0])
            if not spec.act_order and not torch.equal(group_of.cpu(), contiguous):
                raise QuantizationError(f"tensor {disk_name}.g_idx reorders the groups, but {CONFIG_FIELD}.desc_act "
                                        f"is false")
            if torch.equal(group_of.cpu(), contiguous):
                group_of = None
        return IntMatrix(q, scales.float().t().contiguous(), zero, spec.bits, group_of)
