"""Quantized checkpoints, each written by its format's own tooling (tests/quant_checkpoints.py), loaded by thinktalk in
their stored form and compared with the reference (transformers) running on the weights as the format's library
dequantises them: thinker logits within 1e-4 (float32 compute), 32 greedy tokens identical, and where the talker is
quantized, its codec codes identical for 32 frames (through the reference's own vocoder)."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from checkpoints import build_reference, save_reference, tiny_config_dict
from quant_checkpoints import (TALKER_LINEARS, THINKER_LINEARS, compressed_tensors_checkpoint, fp8_block_checkpoint,
                               gptq_checkpoint, quant_tiny_config_dict, reference_from)
from test_speech_pipeline import reference_speech

from thinktalk import Omni
from thinktalk.quant.matrices import QuantMatrices

ATOL = 1e-4
TOKENS = 32
# What the public AWQ checkpoints keep in bf16: routers, lm_head, encoders, the talker, Code2Wav (CT "ignore").
IGNORE_BUT_THINKER = ["re:.*mlp\\.gate$", "lm_head", "re:thinker\\.(audio_tower|visual)\\..*", "re:talker\\..*",
                      "re:code2wav\\..*"]
IGNORE_BUT_BOTH = ["re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "lm_head", "codec_head",
                   "re:thinker\\.(audio_tower|visual)\\..*", "re:talker\\.(code_predictor|text_projection|"
                   "hidden_projection)\\..*", "re:code2wav\\..*"]
# The public FP8 checkpoints' float modules (transformers' modules_to_not_convert).
FP8_SKIP = ["thinker.audio_tower", "thinker.visual", "code2wav", "mlp.gate", "lm_head", "codec_head",
            "shared_expert_gate", "talker.code_predictor", "talker.text_projection", "talker.hidden_projection"]


def ct(weights: dict, fmt: str = "pack-quantized", talker: bool = False):
    pattern = f"{THINKER_LINEARS}|{TALKER_LINEARS}" if talker else THINKER_LINEARS
    return lambda src, out: compressed_tensors_checkpoint(src, out, weights, fmt, pattern,
                                                          IGNORE_BUT_BOTH if talker else IGNORE_BUT_THINKER)


def gptq(bits, group, sym, desc_act, **kw):
    return lambda src, out: gptq_checkpoint(src, out, bits, group, sym, desc_act, **kw)


INT = dict(type="int")
CASES = {
    "ct w4a16 sym g32 (AWQ layout)": ct(dict(INT, num_bits=4, symmetric=True, strategy="group", group_size=32)),
    "ct w4a16 asym g128": ct(dict(INT, num_bits=4, symmetric=False, strategy="group", group_size=128)),
    "ct w4a16 sym channel": ct(dict(INT, num_bits=4, symmetric=True, strategy="channel")),
    "ct w8a16 sym g128": ct(dict(INT, num_bits=8, symmetric=True, strategy="group", group_size=128)),
    "ct w8a16 asym channel": ct(dict(INT, num_bits=8, symmetric=False, strategy="channel")),
    "ct w8a16 naive sym channel": ct(dict(INT, num_bits=8, symmetric=True, strategy="channel"), "naive-quantized"),
    "ct fp8 channel": ct(dict(type="float", num_bits=8, symmetric=True, strategy="channel"), "float-quantized"),
    "ct fp8 block": ct(dict(type="float", num_bits=8, symmetric=True, strategy="block", block_structure=[128, 128]),
                       "float-quantized"),
    "gptq 4-bit g128": gptq(4, 128, True, False),
    "gptq 4-bit g128 desc_act": gptq(4, 128, True, True),
    "gptq 8-bit g128": gptq(8, 128, True, False),
    "gptq_v2 4-bit g32 asym desc_act": gptq(4, 32, False, True, layout="gptq_v2"),
    "auto-round 4-bit g128 sym": gptq(4, 128, True, False, method="auto-round"),
    "auto-round 4-bit g128 asym": gptq(4, 128, False, False, method="auto-round", layout="auto_round"),
}
SPEAKING = {
    "ct w4a16 asym g128, talker too": ct(dict(INT, num_bits=4, symmetric=False, strategy="group", group_size=128),
                                         talker=True),
    "fp8 blocks, thinker and talker": lambda src, out: fp8_block_checkpoint(
        src, out, f"{THINKER_LINEARS}|{TALKER_LINEARS}", FP8_SKIP),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory, qwen_dir):
    reference = build_reference(quant_tiny_config_dict(tiny_config_dict()), seed=7)
    path = save_reference(reference, tmp_path_factory.mktemp("quant_float"))
    for file in qwen_dir.iterdir():
        shutil.copy(file, path / file.name)
    return path


def loaded(make, source, tmp_path):
    """(thinktalk on the quantized files, the reference on the library's dequantised weights)."""
    checkpoint = make(source, tmp_path / "quantized")
    omni = Omni.from_pretrained(checkpoint.path, device="cpu", dtype="float32", show_progress=False)
    if checkpoint.dequantized:
        reference = reference_from(checkpoint.dequantized, source, tmp_path / "dequantized")
    else:  # block FP8: the reference reads the quantized files itself and dequantises them
        from transformers import FineGrainedFP8Config, Qwen3OmniMoeForConditionalGeneration

        reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
            checkpoint.path, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    return omni, reference, checkpoint


def check_thinker(omni, reference, checkpoint):
    # Every linear the file stores quantized is held quantized (experts in their fused module), and nothing else.
    owners = {re.sub(r"\.experts\.\d+\.(gate|up|down)_proj$", ".experts", n) for n in checkpoint.quantized}
    assert owners == set(omni.quantization.chosen)
    assert all(isinstance(omni.model.get_submodule(o).get_submodule(a), QuantMatrices)
               for o in owners for a in (("gate_up_proj", "down_proj") if o.endswith("experts") else ("weight_q",)))
    ids = torch.randint(0, 151_000, (1, 29), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        ours = omni.model.thinker(omni.model.thinker.embed(ids), positions)[0][0]
        theirs = reference.thinker(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert theirs.std() > 1.0, "weights too weak for a meaningful comparison"
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    messages = [{"role": "user", "content": "Tell me about quantized weights."}]
    prompt = omni.prepare(messages)
    with torch.no_grad():
        ref_ids = torch.tensor([prompt.token_ids])
        expected = reference.thinker.generate(input_ids=ref_ids, attention_mask=torch.ones_like(ref_ids),
                                              max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
    result = omni.generate(messages, return_audio=False, max_new_tokens=TOKENS, do_sample=False, stop_token_ids=[-1])
    assert result.token_ids == expected[0, len(prompt.token_ids):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_thinker_matches_reference_on_dequantized_weights(case, source, tmp_path):
    omni, reference, checkpoint = loaded(CASES[case], source, tmp_path)
    assert omni.quantization is not None and omni.quantization.chosen, "nothing was loaded quantized"
    assert all(name.startswith("thinker.model.layers.") for name in omni.quantization.chosen)
    check_thinker(omni, reference, checkpoint)


@pytest.mark.parametrize("case", list(SPEAKING))
def test_quantized_talker_speaks_the_reference_codes(case, source, tmp_path):
    omni, reference, checkpoint = loaded(SPEAKING[case], source, tmp_path)
    assert any(name.startswith("talker.") for name in omni.quantization.chosen), "the talker was not quantized"
    check_thinker(omni, reference, checkpoint)
    reference.talker.config.audio_config = SimpleNamespace(n_window=50)  # reference defect (REFERENCE.md)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say something nice."}]}]
    prompt = omni.prepare(messages)
    expected_tokens, expected_wave = reference_speech(reference, prompt, "ethan")
    result = omni.generate(messages, voice="ethan", max_new_tokens=20, do_sample=False, stop_token_ids=[-1],
                           talker_do_sample=False, talker_max_new_tokens=34)
    assert result.token_ids == expected_tokens
    assert result.codes.shape[1] >= 32
    with torch.no_grad():  # the reference's own vocoder on our codes gives its waveform: the codes are its codes
        theirs_from_ours = reference.code2wav.chunked_decode(result.codes.unsqueeze(0), 300, 25).reshape(-1)
    np.testing.assert_allclose(theirs_from_ours.numpy(), expected_wave, atol=1e-5, rtol=0)
