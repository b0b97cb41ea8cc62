"""The Qwen2.5-Omni demo checkpoint (`thinktalk demo --family qwen2.5`): the released structure (audio and vision
encoders, dense thinker, talker, Token2Wav's DiT and BigVGAN, a speaker file with Chelsie and Ethan) at toy width,
with RANDOM weights, the released special token ids and Qwen's vocabulary. Its words are meaningless; it shows the
Qwen2.5-Omni path runs end to end on a fresh machine. Built and cached like the Qwen3-Omni demo (demo.py).
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config_qwen2_5 import parse_qwen2_5_config
from .models.qwen2_5.omni import Qwen25OmniModel
from .models.qwen2_5.voices import SPEAKER_FILE
from .processing.qwen2_5_tokenizer import build_qwen2_5_tokenizer_files
from .weights import SINGLE_FILE

QWEN2_5_DEMO_NOTICE = ("thinktalk demo checkpoint: the Qwen2.5-Omni structure with RANDOM weights - its words are "
                       "meaningless. Pass --model DIR to use a real checkpoint.")
QWEN2_5_DEMO_VERSION = 1  # bump when the config or the weight recipe changes
QWEN2_5_DEMO_SEED = 20251201
VOICE_BOS_TOKENS = {"Chelsie": 151870, "Ethan": 151871}  # the released voices' talker prompt tokens
REFERENCE_MEL_FRAMES = 40  # frames of each random voice's reference mel
REFERENCE_MEL_OFFSET = -4.0  # log-mel values of quiet speech sit around here
# Token2Wav's random weights: gains that keep the ODE's state and the wave in range (see randomize_token2wav_).
DIT_GATE_SCALE = 0.3
VOCODER_STAGE_GAIN = 0.6
VOCODER_OUTPUT_GAIN = 0.15


def qwen2_5_demo_config() -> dict:
    return json.loads(resources.files("thinktalk").joinpath("assets/demo_qwen2_5_config.json").read_text())


def write_qwen2_5_demo_checkpoint(directory: Path) -> None:
    """config.json (written last: it marks the directory complete), weights, speaker file, tokenizer."""
    from .demo import randomize_

    config = qwen2_5_demo_config()
    cfg = parse_qwen2_5_config(config)
    model = Qwen25OmniModel(cfg, audio_output=True)
    randomize_(model, QWEN2_5_DEMO_SEED)
    randomize_token2wav_(model.token2wav, QWEN2_5_DEMO_SEED + 1)
    tensors = {name: tensor.contiguous().clone() for name, tensor in sorted(model.state_dict().items())}
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    torch.save(random_voices(cfg.token2wav.dit.enc_emb_dim, cfg.token2wav.dit.mel_dim, QWEN2_5_DEMO_SEED + 2),
               directory / SPEAKER_FILE)
    build_qwen2_5_tokenizer_files(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def randomize_token2wav_(token2wav: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, 1/fan_in) over all their input axes, embeddings N(0, 1), SnakeBeta away from identity; the
    DiT's AdaLN gates and the vocoder's stages scaled down so that nothing diverges and the wave stays audible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in token2wav.named_parameters():  # module order: the parity tests draw the same
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("codec_embed.weight"):
                param.copy_(noise)
            elif name.endswith((".alpha", ".beta")):
                param.copy_(0.3 * noise)
            elif param.dim() >= 2:
                param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(1.0 + 0.1 * noise)
        dit = token2wav.code2wav_dit_model
        for block in dit.transformer_blocks:
            block.attn_norm.linear.weight.mul_(DIT_GATE_SCALE)
        dit.norm_out.linear.weight.mul_(DIT_GATE_SCALE)
        vocoder = token2wav.code2wav_bigvgan_model
        for up in vocoder.ups:
            up[0].weight.mul_(VOCODER_STAGE_GAIN)
        vocoder.conv_post.weight.mul_(VOCODER_OUTPUT_GAIN)


def random_voices(cond_dim: int, mel_dim: int, seed: int) -> dict[str, dict]:
    """spk_dict.pt's layout: per voice its talker prompt token, `cond` (1, cond_dim), `ref_mel` (1, frames, mel)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: {"bos_token": bos, "cond": torch.randn(1, cond_dim, generator=generator),
                   "ref_mel": torch.randn(1, REFERENCE_MEL_FRAMES, mel_dim, generator=generator) + REFERENCE_MEL_OFFSET}
            for name, bos in VOICE_BOS_TOKENS.items()}
