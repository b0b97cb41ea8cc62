"""Bad quantized checkpoints: each is a good one (tests/quant_checkpoints.py) with one thing wrong in its config.json
or its model.safetensors, and each must fail with a QuantizationError / CheckpointError naming the tensor or the
`quantization_config` field, never with a raw library exception, and never returning a half-loaded model."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import build_reference, save_reference, tiny_config_dict
from quant_checkpoints import (THINKER_LINEARS, compressed_tensors_checkpoint, fp8_block_checkpoint, gptq_checkpoint,
                               quant_tiny_config_dict)
from safetensors.torch import load_file, save_file

from thinktalk import Omni
from thinktalk.quant import QuantizationError, QuantizeOnLoad
from thinktalk.weights import CheckpointError

# What stays float: everything but the thinker's attention projections and experts.
IGNORE = ["re:.*mlp\\.gate$", "lm_head", "re:thinker\\.(audio_tower|visual)\\..*", "re:talker\\..*",
          "re:code2wav\\..*"]
FP8_SKIP = ["thinker.audio_tower", "thinker.visual", "code2wav", "mlp.gate", "lm_head", "talker"]

Q = "thinker.model.layers.0.self_attn.q_proj"  # (128, 128)
EXPERT = "thinker.model.layers.1.mlp.experts.3"  # gate_proj / up_proj / down_proj, (128, 128) each
FIELD = r"(?<![.\w])quantization_config\."  # not preceded by another name: the field as written


def name(text: str) -> str:
    """A dotted tensor or field name as a regular expression."""
    return re.escape(text)


@pytest.fixture(scope="module")
def source(tmp_path_factory, qwen_dir) -> Path:
    reference = build_reference(quant_tiny_config_dict(tiny_config_dict(talker=False)), seed=11)
    path = save_reference(reference, tmp_path_factory.mktemp("quant_errors_float"))
    for file in qwen_dir.iterdir():
        shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def good(source, tmp_path_factory) -> dict[str, Path]:
    """One good quantized checkpoint per format (and the act-order GPTQ one), each loading as it is."""
    root = tmp_path_factory.mktemp("quant_errors_good")
    paths = {
        "ct": compressed_tensors_checkpoint(source, root / "ct", dict(type="int", num_bits=4, symmetric=False,
                                                                       strategy="group", group_size=32),
                                            "pack-quantized", THINKER_LINEARS, IGNORE).path,
        "gptq": gptq_checkpoint(source, root / "gptq", 4, 128, True, False).path,
        "gptq desc_act": gptq_checkpoint(source, root / "gptq_desc_act", 4, 32, True, True).path,
        "fp8": fp8_block_checkpoint(source, root / "fp8", THINKER_LINEARS, FP8_SKIP).path,
    }
    for path in paths.values():  # the edits below are the only thing wrong with them
        assert load(path).quantization.chosen
    return paths


def load(path: Path, **kw) -> Omni:
    return Omni.from_pretrained(path, device="cpu", dtype="float32", audio_output=False, show_progress=False, **kw)


def edited(path: Path, tmp_path: Path, config: Callable[[dict], None] | None = None,
           tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """A copy of the checkpoint at `path` with its quantization_config (or config, when it has none) and/or its
    tensors changed in place by the callables. Files left as they are are links to the originals (fast)."""
    out = tmp_path / "bad"
    out.mkdir()
    for file in path.iterdir():
        (out / file.name).symlink_to(file)
    if config is not None:
        data = json.loads((path / "config.json").read_text())
        config(data.get("quantization_config", data))
        (out / "config.json").unlink()
        (out / "config.json").write_text(json.dumps(data, indent=1))
    if tensors is not None:
        weights = load_file(path / "model.safetensors")
        tensors(weights)
        (out / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
    return out


def fails(path: Path, error: type[Exception], match: str, **kw) -> None:
    with pytest.raises(error, match=match):
        load(path, **kw)


def weights_of(c: dict) -> dict:
    return c["config_groups"]["group_0"]["weights"]


# ----------------------------------------------------------------------------------------------------------------
# compressed-tensors


def test_ct_missing_weight_scale(good, tmp_path):
    path = edited(good["ct"], tmp_path, tensors=lambda t: t.pop(f"{Q}.weight_scale"))
    fails(path, CheckpointError, rf"missing.*{name(Q)}\.weight_scale\b")


def test_ct_missing_expert_zero_point(good, tmp_path):
    path = edited(good["ct"], tmp_path, tensors=lambda t: t.pop(f"{EXPERT}.up_proj.weight_zero_point"))
    fails(path, CheckpointError, rf"missing.*{name(EXPERT)}\.up_proj\.weight_zero_point")


def test_ct_weight_packed_of_the_wrong_shape(good, tmp_path):
    def edit(t):
        t[f"{Q}.weight_packed"] = t[f"{Q}.weight_packed"][:, :8]

    path = edited(good["ct"], tmp_path, tensors=edit)
    fails(path, CheckpointError, rf"tensor {name(Q)}\.weight_packed has shape \[128, 8\], expected \[128, 16\]")


def test_ct_three_bits(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: weights_of(c).update(num_bits=3))
    fails(path, QuantizationError, rf"{FIELD}config_groups\.group_0\.weights\.num_bits: 3-bit")


def test_ct_group_size_not_dividing_the_width(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: weights_of(c).update(group_size=96))
    fails(path, QuantizationError, rf"{FIELD}config_groups\.group_0\.weights\.group_size 96 does not divide the "
                                   rf"input width 128")


def test_ct_not_compressed(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: c.update(quantization_status="frozen"))
    fails(path, QuantizationError, rf"{FIELD}quantization_status must be 'compressed'.*'frozen'")


def test_ct_ignored_module_holding_quantized_pieces(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: c["ignore"].append(Q))
    fails(path, CheckpointError, rf"tensor {name(Q)}\.weight_(packed|scale|shape|zero_point) is a piece of a "
                                 rf"quantized matrix, but quantization_config .* keeps {name(Q)} in float")


def test_ct_ignored_expert_is_fused_with_quantized_ones(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: c["ignore"].append(f"{EXPERT}.gate_proj"))
    fails(path, QuantizationError, rf"{name(EXPERT)}\.gate_proj is stored as float, but the experts it is fused "
                                   rf"with as int4")


def test_ct_quantized_module_stored_as_float(good, source, tmp_path):
    float_weight = load_file(source / "model.safetensors")[f"{Q}.weight"].to(torch.bfloat16)

    def edit(t):
        for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            del t[f"{Q}.{suffix}"]
        t[f"{Q}.weight"] = float_weight

    path = edited(good["ct"], tmp_path, tensors=edit)
    fails(path, CheckpointError, rf"tensor {name(Q)}\.weight does not belong to .*quantization_config .* "
                                 rf"quantizes {name(Q)}")


def test_ct_weight_shape_disagreeing_with_the_model(good, tmp_path):
    def edit(t):
        t[f"{Q}.weight_shape"] = torch.tensor([128, 96], dtype=t[f"{Q}.weight_shape"].dtype)

    path = edited(good["ct"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"tensor {name(Q)}\.weight_shape says \[128, 96\], but the model's {name(Q)} "
                                   rf"is \[128, 128\]")


def test_ct_weight_packed_of_dtype_int64(good, tmp_path):
    def edit(t):
        t[f"{Q}.weight_packed"] = t[f"{Q}.weight_packed"].to(torch.int64)

    path = edited(good["ct"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"tensor {name(Q)}\.weight_packed has dtype torch\.int64, but "
                                   rf"{FIELD}config_groups\.group_0\.format needs torch\.int32")


def test_ct_weight_scale_of_an_integer_dtype(good, tmp_path):
    def edit(t):
        t[f"{EXPERT}.down_proj.weight_scale"] = t[f"{EXPERT}.down_proj.weight_scale"].to(torch.int32)

    path = edited(good["ct"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"tensor {name(EXPERT)}\.down_proj\.weight_scale has dtype torch\.int32, but "
                                   rf"{FIELD}config_groups\.group_0\.weights needs")


@pytest.mark.parametrize("where, edit", [
    ("config_groups.group_0.targets", lambda c: c["config_groups"]["group_0"].update(targets=["re:(q|k_proj"])),
    ("ignore", lambda c: c["ignore"].append("re:.*[gate")),
])
def test_ct_invalid_regular_expression(good, tmp_path, where, edit):
    path = edited(good["ct"], tmp_path, config=edit)
    fails(path, QuantizationError, rf"{FIELD}{name(where)}: .* is not a valid regular expression")


def test_ct_targets_not_a_list(good, tmp_path):
    path = edited(good["ct"], tmp_path, config=lambda c: c["config_groups"]["group_0"].update(targets="Linear"))
    fails(path, QuantizationError, rf"{FIELD}config_groups\.group_0\.targets must be a list")


def act_order(change: Callable[[torch.Tensor], None]):
    """Edits making the compressed-tensors checkpoint act-order ("actorder": "group"): a weight_g_idx for every
    quantized linear (contiguous groups of 32, so it loads as it is), then `change` applied to q_proj's."""

    def config(c):
        weights_of(c).update(actorder="group")

    def tensors(t):
        for key in [k for k in t if k.endswith(".weight_shape")]:
            g_idx = (torch.arange(128) // 32).to(torch.int32)
            if key == f"{Q}.weight_shape":
                change(g_idx)
            t[key.replace(".weight_shape", ".weight_g_idx")] = g_idx

    return dict(config=config, tensors=tensors)


def test_ct_act_order_loads(good, tmp_path):
    assert load(edited(good["ct"], tmp_path, **act_order(lambda g: None))).quantization.chosen


@pytest.mark.parametrize("value", [4, -1])
def test_ct_weight_g_idx_out_of_range(good, tmp_path, value):
    path = edited(good["ct"], tmp_path, **act_order(lambda g: g.__setitem__(3, value)))
    fails(path, QuantizationError, rf"tensor {name(Q)}\.weight_g_idx names groups outside \[0, 4\)")


def test_ct_weight_g_idx_of_uneven_groups(good, tmp_path):
    path = edited(good["ct"], tmp_path, **act_order(lambda g: g.__setitem__(3, 1)))  # groups of 31 and 33
    fails(path, QuantizationError, rf"{name(Q)}: the groups of a 128x128 matrix \(g_idx\) are not 32 contiguous")


# ----------------------------------------------------------------------------------------------------------------
# GPTQ / AutoRound


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_unsupported_bits(good, tmp_path, bits):
    path = edited(good["gptq"], tmp_path, config=lambda c: c.update(bits=bits))
    fails(path, QuantizationError, rf"{FIELD}bits: {bits}-bit weights are not supported")


def test_gptq_sixteen_bits_at_the_top_level(good, tmp_path):
    path = edited(good["gptq"], tmp_path, config=lambda c: c.update(bits=16))
    fails(path, QuantizationError, rf"{FIELD}bits: 16-bit weights are not supported")


def test_gptq_dynamic_sixteen_bits_keeps_a_module_float(good, tmp_path):
    path = edited(good["gptq"], tmp_path, config=lambda c: c.update(dynamic={rf"+:.*layers\.0\.self_attn\.q_proj$":
                                                                             {"bits": 16}}))
    fails(path, CheckpointError, rf"tensor {name(Q)}\.\w+ is a piece of a quantized matrix, but quantization_config "
                                 rf".* keeps {name(Q)} in float")


@pytest.mark.parametrize("field, value, problem", [
    ("dynamic", {"-:re:(.*q_proj": {}}, "is not a valid regular expression"),
    ("dynamic", ["-:.*q_proj"], "must map module patterns to settings"),
    ("extra_config", [Q], "must map module names to settings"),
    ("modules_to_not_convert", "lm_head", "must be a list of module names"),
])
def test_gptq_malformed_module_selection(good, tmp_path, field, value, problem):
    path = edited(good["gptq"], tmp_path, config=lambda c: c.update({field: value}))
    fails(path, QuantizationError, rf"{FIELD}{field}\b.*{problem}")


def test_gptq_missing_qzeros(good, tmp_path):
    path = edited(good["gptq"], tmp_path, tensors=lambda t: t.pop(f"{EXPERT}.gate_proj.qzeros"))
    fails(path, CheckpointError, rf"missing.*{name(EXPERT)}\.gate_proj\.qzeros")


def test_gptq_scales_of_the_wrong_shape(good, tmp_path):
    def edit(t):
        t[f"{Q}.scales"] = t[f"{Q}.scales"].repeat(2, 1)

    path = edited(good["gptq"], tmp_path, tensors=edit)
    fails(path, CheckpointError, rf"tensor {name(Q)}\.scales has shape \[2, 128\], expected \[1, 128\]")


def test_gptq_g_idx_reordering_groups_without_desc_act(good, tmp_path):
    path = edited(good["gptq desc_act"], tmp_path, config=lambda c: c.update(desc_act=False))
    fails(path, QuantizationError, rf"tensor thinker\.model\.layers\.\d\.\S+\.g_idx reorders the groups, but "
                                   rf"{FIELD}desc_act is false")


@pytest.mark.parametrize("value", [1, -1])
def test_gptq_g_idx_out_of_range(good, tmp_path, value):
    def edit(t):
        t[f"{Q}.g_idx"][5] = value  # one group (128 inputs, group_size 128): only 0 is a group

    path = edited(good["gptq"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"tensor {name(Q)}\.g_idx names groups outside \[0, 1\)")


@pytest.mark.parametrize("method, field, layout", [("auto-round", "packing_format", "auto_round:auto_awq"),
                                                   ("gptq", "checkpoint_format", "marlin")])
def test_gptq_unknown_packing(good, tmp_path, method, field, layout):
    def edit(c):
        c.pop("checkpoint_format")
        c.update({"quant_method": method, field: layout})

    path = edited(good["gptq"], tmp_path, config=edit)
    fails(path, QuantizationError, rf"{FIELD}{field}: '{layout}' is not supported \(supported: .*gptq")


def test_gptq_expert_gate_and_up_with_different_g_idx(good, tmp_path):
    def edit(t):
        gate = t[f"{EXPERT}.gate_proj.g_idx"]
        t[f"{EXPERT}.up_proj.g_idx"] = gate.roll(1)  # still 4 groups of 32, in another input order

    path = edited(good["gptq desc_act"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"{name(EXPERT)}\.gate_proj and {name(EXPERT)}\.up_proj: .*g_idx.* must share "
                                   rf"one input order")


# ----------------------------------------------------------------------------------------------------------------
# Block FP8


def test_fp8_weight_stored_as_bfloat16(good, tmp_path):
    def edit(t):
        t[f"{Q}.weight"] = t[f"{Q}.weight"].to(torch.bfloat16)

    path = edited(good["fp8"], tmp_path, tensors=edit)
    fails(path, QuantizationError, rf"tensor {name(Q)}\.weight has dtype torch\.bfloat16, but {FIELD}quant_method "
                                   rf"'fp8' quantizes {name(Q)}")


def test_fp8_missing_weight_scale_inv(good, tmp_path):
    path = edited(good["fp8"], tmp_path, tensors=lambda t: t.pop(f"{EXPERT}.down_proj.weight_scale_inv"))
    fails(path, CheckpointError, rf"missing.*{name(EXPERT)}\.down_proj\.weight_scale_inv")


@pytest.mark.parametrize("block", [[128], [128, 128, 128], [0, 128]])
def test_fp8_weight_block_size_of_the_wrong_length(good, tmp_path, block):
    path = edited(good["fp8"], tmp_path, config=lambda c: c.update(weight_block_size=block))
    fails(path, QuantizationError, rf"{FIELD}weight_block_size must be two positive sizes")


def test_fp8_e5m2(good, tmp_path):
    path = edited(good["fp8"], tmp_path, config=lambda c: c.update(fmt="e5m2"))
    fails(path, QuantizationError, rf"{FIELD}fmt must be 'e4m3'.*'e5m2'")


def test_fp8_static_activations(good, tmp_path):
    path = edited(good["fp8"], tmp_path, config=lambda c: c.update(activation_scheme="static"))
    fails(path, QuantizationError, rf"{FIELD}activation_scheme must be 'dynamic'.*'static'")


# ----------------------------------------------------------------------------------------------------------------
# Methods and quantize on load


@pytest.mark.parametrize("method", ["awq", "bitsandbytes"])
def test_unknown_quant_method(good, tmp_path, method):
    path = edited(good["gptq"], tmp_path, config=lambda c: c.update(quant_method=method))
    fails(path, QuantizationError, rf"{FIELD}quant_method: '{method}' is not supported \(supported: fp8, "
                                   rf"compressed-tensors, gptq, auto-round\)")


def test_quantize_on_load_for_a_quantized_checkpoint(good):
    fails(good["ct"], QuantizationError, rf"already quantized \({FIELD}quant_method 'compressed-tensors'\).*"
                                         rf"without quantize=", quantize="int4")


def test_quantize_int5(source):
    fails(source, QuantizationError, r"quantize='int5' is not supported; use one of int8, int4, fp8", quantize="int5")


def test_quantize_on_load_group_16():
    with pytest.raises(QuantizationError, match=r"group_size 16 is not supported for int4; use one of 256, 128"):
        QuantizeOnLoad("int4", group_size=16)


# ----------------------------------------------------------------------------------------------------------------
# A float checkpoint holding quantized pieces


def test_float_checkpoint_with_quantized_pieces(source, tmp_path):
    def edit(t):
        t[f"{Q}.weight_packed"] = t.pop(f"{Q}.weight")

    path = edited(source, tmp_path, tensors=edit)
    fails(path, CheckpointError, rf"tensor {name(Q)}\.weight_packed is a piece of a quantized matrix, but .*has no "
                                 rf"quantization_config")


def test_quantize_on_load_of_a_checkpoint_holding_quantized_pieces(source, tmp_path):
    def edit(t):
        t[f"{Q}.weight_packed"] = t.pop(f"{Q}.weight")

    path = edited(source, tmp_path, tensors=edit)
    fails(path, CheckpointError, rf"tensor {name(Q)}\.weight_packed is a piece of a quantized matrix, but config\.json "
                                 rf"has no quantization_config, and quantize on load needs a float checkpoint",
          quantize="int4")
