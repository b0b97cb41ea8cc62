"""Tiny random Qwen3-Omni checkpoints written by the reference implementation (transformers), for parity tests.

`save_pretrained` writes exactly the released on-disk layout, so these directories exercise thinktalk's real
loading path. Weights are drawn N(0, 1/sqrt(fan_in)) (stronger than the reference's default init) so that routing
spreads over experts and the top tokens are well separated; see REFERENCE.md.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

# The released Qwen3-Omni-30B-A3B-Instruct config.json (public data, as transformers 5.x loads it), kept in the repository.
FULL_CONFIG = Path(__file__).resolve().parent / "data" / "qwen3-omni-30b-a3b-instruct.config.json"


def full_config_dict() -> dict:
    return json.loads(FULL_CONFIG.read_text())


def tiny_config_dict(*, norm_topk_prob: bool = True, talker: bool = True) -> dict:
    """The released config shrunk to a few layers and tiny widths; token ids and structure unchanged."""
    c = copy.deepcopy(full_config_dict())
    c["dtype"] = "float32"
    t = c["thinker_config"]
    t["dtype"] = "float32"
    t["audio_config"].update(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2,
                             downsample_hidden_size=16, output_dim=64)
    t["vision_config"].update(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                              deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
    t["text_config"].update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                            num_hidden_layers=3, norm_topk_prob=norm_topk_prob)
    t["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    k = c["talker_config"]
    k.update(thinker_hidden_size=64, accept_hidden_layer=2)
    k["text_config"].update(hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                            num_hidden_layers=2, shared_expert_intermediate_size=32, norm_topk_prob=norm_topk_prob)
    k["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    k["code_predictor_config"].update(hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                      layer_types=["full_attention"] * 2)
    c["code2wav_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                                num_hidden_layers=2, decoder_dim=32, codebook_dim=16,
                                vector_quantization_hidden_dimension=16)
    if not talker:
        c["enable_audio_output"] = False
        del c["talker_config"], c["code2wav_config"]
    return c


def strengthen_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight: matrices N(0, 1/sqrt(fan_in)), norms near 1, biases small, lm_head a little stronger."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                fan_in = p.shape[-1] if p.dim() == 2 else math.prod(p.shape[1:]) if "conv" in name else p.shape[-1]
                std = 1.0 / math.sqrt(fan_in)
                if name.endswith("lm_head.weight") or name.endswith("codec_head.weight"):
                    std *= 4.0
                if "embed" in name:
                    std = 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name or name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


# Gains of the tiny random code2wav: per decoder block (random blocks otherwise double the amplitude each, which
# makes SnakeBeta's sin() ill-conditioned) and at the output, so the wave stays mostly inside [-1, 1].
DECODER_BLOCK_GAIN = 0.5
CODE2WAV_GAIN = 4.0


def strengthen_code2wav_(code2wav: nn.Module, seed: int) -> None:
    """Make every code2wav path matter: SnakeBeta away from identity, layer scales and ConvNeXt gammas near 0.5,
    and scale the last conv so the wave stays mostly inside [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in code2wav.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("layer_scale.scale", ".gamma")):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen))
        for block in code2wav.decoder[1:-2]:  # halve each block's gain: activations stay O(1), well conditioned
            block.block[1].conv.weight.mul_(DECODER_BLOCK_GAIN)
            for unit in block.block[2:]:
                unit.conv2.conv.weight.mul_(DECODER_BLOCK_GAIN)
        code2wav.decoder[-1].conv.weight.mul_(CODE2WAV_GAIN)


def build_reference(config: dict, seed: int = 0):
    """A float32 reference model with strong random weights."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**copy.deepcopy(config))).float().eval()
    strengthen_(model, seed)
    if model.has_talker:
        strengthen_code2wav_(model.code2wav, seed + 1)
    return model


def save_reference(model, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def load_as_omni(reference):
    """The reference's weights written as a checkpoint (with the Qwen tokenizer files) and loaded by thinktalk on the
    CPU in float32: the benches' way to run both engines on the same random model. The files are gone afterwards."""
    import tempfile

    from thinktalk.omni import Omni
    from thinktalk.processing.tokenizer import build_qwen_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference(reference, Path(tmp) / "ckpt")
        build_qwen_tokenizer_files(path)
        return Omni.from_pretrained(path, device="cpu", dtype="float32", show_progress=False)
