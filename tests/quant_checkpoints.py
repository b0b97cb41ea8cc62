"""Tiny quantized Qwen3-Omni checkpoints, written by each format's own tooling where it installs, for the format tests.

    compressed-tensors  the `compressed_tensors` package: calculate_qparams, its compressors, QuantizationConfig
    GPTQ / AutoRound    auto-round's own QuantLinear packs (contiguous groups, v1 zeros); act-order and v2 files
                        are written here as the format documents them; all are dequantised by auto-round's own
                        QuantLinear forward (with the g_idx) for the reference
    FP8 blocks          written here as transformers' fine-grained FP8 documents them; the reference reads them back
                        itself (`FineGrainedFP8Config(dequantize=True)`)

Every writer starts from the float reference's on-disk tensors and returns the quantized checkpoint plus the on-disk
float tensors the reference should run on: the weights as the format's own library dequantises them.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The thinker's attention projections and experts (what the public AWQ / GPTQ checkpoints quantize) and, where
# asked, the talker's too; the rest stays float.
THINKER_LINEARS = r"thinker\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)"
TALKER_LINEARS = r"talker\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj" \
                 r"|mlp\.shared_expert\.(gate|up|down)_proj)"


def quant_tiny_config_dict(base: dict) -> dict:
    """The tiny test config at widths every kernel takes (inputs multiples of 128, outputs of 16), with a talker
    as wide as the thinker so its matrices quantize too."""
    import copy

    c = copy.deepcopy(base)
    t = c["thinker_config"]
    t["audio_config"]["output_dim"] = 128
    t["vision_config"]["out_hidden_size"] = 128
    t["text_config"].update(hidden_size=128, intermediate_size=128, moe_intermediate_size=128, head_dim=32,
                            num_hidden_layers=2)
    t["text_config"]["rope_parameters"]["mrope_section"] = [8, 4, 4]
    if "talker_config" in c:
        k = c["talker_config"]
        k.update(thinker_hidden_size=128, accept_hidden_layer=1)
        k["text_config"].update(hidden_size=128, intermediate_size=128, moe_intermediate_size=128, head_dim=32,
                                shared_expert_intermediate_size=128)
        k["text_config"]["rope_parameters"]["mrope_section"] = [8, 4, 4]
        k["code_predictor_config"].update(hidden_size=128, intermediate_size=128, head_dim=32)
    return c


def disk_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@dataclass
class QuantizedCheckpoint:
    path: Path  # the quantized checkpoint (config with quantization_config, tokenizer files)
    dequantized: dict[str, torch.Tensor]  # on-disk name -> float32 tensor, as the format's library dequantises
    quantized: list[str] = field(default_factory=list)  # on-disk linears (without .weight) stored quantized


def write_checkpoint(float_dir: Path, out: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    """Copy float_dir's non-weight files (tokenizer, generation config) and write tensors + config."""
    out.mkdir(parents=True, exist_ok=True)
    for file in float_dir.iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(file, out / file.name)
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    return out


def linears(tensors: dict[str, torch.Tensor], pattern: str) -> list[str]:
    return sorted(k[: -len(".weight")] for k, v in tensors.items()
                  if k.endswith(".weight") and v.dim() == 2 and re.fullmatch(pattern, k[: -len(".weight")]))


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors


def compressed_tensors_checkpoint(float_dir: Path, out: Path, weights: dict, fmt: str, pattern: str,
                                  ignore: list[str]) -> QuantizedCheckpoint:
    """weights: QuantizationArgs fields (num_bits, type, symmetric, strategy, group_size, block_structure).
    Modules matching `pattern` are quantized; `ignore` is written to the config (it must exclude the rest)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors = disk_tensors(float_dir)
    dequantized = {k: v.float() for k, v in tensors.items()}
    names = linears(tensors, pattern)
    for name in names:
        w = tensors.pop(f"{name}.weight").float()
        low, high = _ranges(w, args)
        scale, zero = calculate_qparams(low, high, args)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        packed = compressor.compress(state, scheme)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        dequantized[f"{name}.weight"] = compressor.decompress(packed, scheme)["weight"].float()
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                                quantization_status="compressed").model_dump()
    return QuantizedCheckpoint(write_checkpoint(float_dir, out, tensors, config), dequantized, names)


def _ranges(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row / per-group / per-block min and max, shaped as the format's scales."""
    n, k = w.shape
    if args.strategy == "group":
        g = w.view(n, k // args.group_size, args.group_size)
        return g.amin(-1), g.amax(-1)
    if args.strategy == "block":
        rows, cols = args.block_structure
        padded = torch.nn.functional.pad(w, (0, -k % cols, 0, -n % rows))
        t = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        return t.amin((1, 3)), t.amax((1, 3))
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ / AutoRound


def gptq_checkpoint(float_dir: Path, out: Path, bits: int, group_size: int, sym: bool, desc_act: bool,
                    method: str = "gptq", layout: str | None = None, pattern: str = THINKER_LINEARS,
                    blocks: list[str] | None = None) -> QuantizedCheckpoint:
    """layout: checkpoint_format ("gptq" / "gptq_v2") or auto-round's packing_format."""
    v1 = layout in (None, "gptq", "auto_round:auto_gptq")
    tensors = disk_tensors(float_dir)
    dequantized = {k: v.float() for k, v in tensors.items()}
    names = linears(tensors, pattern)
    for name in names:
        w = tensors.pop(f"{name}.weight").float()
        g_idx = _g_idx(w.shape[1], group_size, desc_act, _input_seed(name))
        scales, zeros = _gptq_qparams(w, g_idx, bits, sym)
        # auto-round 0.16.1 packs contiguous groups in the v1 layout; its v2 packer fails (it reads a `device`
        # attribute its QuantLinear lacks), so act-order and v2 files are packed here, per the format.
        by_hand = desc_act or not v1
        packed = (_pack_by_hand if by_hand else _pack_with_auto_round)(w, scales, zeros, g_idx, bits, group_size, v1)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        dequantized[f"{name}.weight"] = auto_round_dequantize(packed, bits, group_size, w.shape, v1)
    config = {"quant_method": method, "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act}
    config["block_name_to_quantize"] = blocks or ["thinker.model.layers"]
    if method == "gptq":
        config["checkpoint_format"] = layout or "gptq"
    else:
        config["packing_format"] = layout or "auto_round:auto_gptq"
    return QuantizedCheckpoint(write_checkpoint(float_dir, out, tensors, config), dequantized, names)


def _input_seed(name: str) -> int:
    """One seed per layer input: linears reading the same activations (q/k/v, an expert's gate and up) get the same
    act-order permutation, as GPTQ derives it from the input's Hessian."""
    import zlib

    shared = re.sub(r"\.(q_proj|k_proj|v_proj)$", ".qkv", re.sub(r"\.(gate_proj|up_proj)$", ".gate_up", name))
    return zlib.crc32(shared.encode())


def _g_idx(k: int, group_size: int, desc_act: bool, seed: int) -> torch.Tensor:
    """Group of each input channel; with desc_act, groups are formed in a random channel order (as GPTQ orders
    channels by their Hessian)."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


def _gptq_qparams(w: torch.Tensor, g_idx: torch.Tensor, bits: int, sym: bool):
    """(N, G) scales and integer zeros from each group's range (round to nearest)."""
    top = 2 ** bits - 1
    groups = int(g_idx.max()) + 1
    members = [w[:, g_idx == g] for g in range(groups)]
    low = torch.stack([m.amin(-1) for m in members], 1).clamp(max=0)
    high = torch.stack([m.amax(-1) for m in members], 1).clamp(min=0)
    if sym:
        scale = torch.maximum(high, -low) * 2 / top
        zero = torch.full_like(scale, float((top + 1) // 2))
    else:
        scale = (high - low) / top
        zero = (-low / scale).round()
    return scale.clamp(min=1e-8).half().float(), zero


def _pack_with_auto_round(w, scales, zeros, g_idx, bits, group_size, v1):
    if v1:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    else:
        from auto_round_extension.torch.qlinear_torch import QuantLinear
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    layer = QuantLinear(bits, group_size, w.shape[1], w.shape[0], bias=False)
    layer.pack(linear, scales, zeros, g_idx, device="cpu")
    return {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": g_idx}


def _pack_by_hand(w, scales, zeros, g_idx, bits, group_size, v1):
    """The GPTQ layout for groups given by g_idx: qweight (K/per, N) along the input dim, qzeros (G, N/per) along
    the output dim (minus one in the v1 layout), fp16 scales (G, N), g_idx (K,)."""
    top, per = 2 ** bits - 1, 32 // bits
    index = g_idx.long()
    q = (w / scales[:, index] + zeros[:, index]).round().clamp(0, top).to(torch.int64)  # (N, K)
    stored_zeros = (zeros - (1 if v1 else 0)).clamp(0, top).to(torch.int64)  # (N, G)
    shifts = torch.arange(per) * bits
    qweight = (q.t().reshape(-1, per, q.shape[0]) << shifts.view(1, per, 1)).sum(1)  # (K/per, N)
    qzeros = (stored_zeros.t().reshape(stored_zeros.shape[1], -1, per) << shifts).sum(-1)  # (G, N/per)
    return {"qweight": _as_int32(qweight), "qzeros": _as_int32(qzeros), "scales": scales.t().half().contiguous(),
            "g_idx": g_idx}


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def auto_round_dequantize(packed: dict[str, torch.Tensor], bits: int, group_size: int, shape, v1: bool):
    """(N, K) float32: auto-round's own QuantLinear forward on the identity, its scales held in float32 so the
    products are exact (in float16 they round)."""
    if v1:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    else:
        from auto_round_extension.torch.qlinear_torch import QuantLinear
    n, k = shape
    layer = QuantLinear(bits, group_size, k, n, bias=False, g_idx=True)
    layer.qweight, layer.qzeros, layer.g_idx = packed["qweight"], packed["qzeros"], packed["g_idx"]
    layer.scales = packed["scales"].float()
    layer.dequant_dtype = torch.int32
    with torch.no_grad():
        return layer(torch.eye(k)).t().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Block FP8 (transformers' fine-grained FP8)


def fp8_block_checkpoint(float_dir: Path, out: Path, pattern: str, skip: list[str],
                         block: tuple[int, int] = (128, 128)) -> QuantizedCheckpoint:
    """weight = e4m3(w / s), weight_scale_inv = s = amax / 448 per block (edge blocks partial)."""
    tensors = disk_tensors(float_dir)
    names = linears(tensors, pattern)
    rows, cols = block
    for name in names:
        w = tensors.pop(f"{name}.weight").float()
        n, k = w.shape
        padded = torch.nn.functional.pad(w, (0, -k % cols, 0, -n % rows))
        tiles = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        scale = tiles.abs().amax((1, 3)).clamp(min=1e-12) / 448.0
        expanded = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
        tensors[f"{name}.weight"] = (w / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale_inv"] = scale
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
              "modules_to_not_convert": skip}
    return QuantizedCheckpoint(write_checkpoint(float_dir, out, tensors, config), {}, names)


def reference_from(dequantized: dict[str, torch.Tensor], float_dir: Path, out: Path):
    """The reference (transformers) model loaded from a float checkpoint holding `dequantized`."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    write_checkpoint(float_dir, out, dequantized, None)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()

