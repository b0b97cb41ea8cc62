"""The built-in demo checkpoint: the full Qwen3-Omni structure at toy width, with RANDOM weights.

It has every module of the released Instruct model (audio and vision encoders, MoE thinker, talker with its shared
expert, code predictor, code2wav), the real special token ids and the real Qwen vocabulary (converted offline from
the `dashscope` package). Its words are meaningless: it exists so that every path of thinktalk runs on a fresh
machine in seconds. Any real checkpoint directory works in its place.

It is created deterministically on first use and cached; a half-written cache is never visible (it is built in a
temporary directory beside the cache and renamed into place).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import parse_config
from .models.code2wav import Code2Wav
from .models.omni import OmniModel
from .processing.tokenizer import build_qwen_tokenizer_files
from .weights import SINGLE_FILE, checkpoint_layout

DEMO_VERSION = 2  # bump when the demo's config or weight recipe changes: a new cache directory is made
DEMO_SEED = 20251122
# The demo's speech level. Random weights drive Code2Wav's last convolution far past [-1, 1] (every sample clips at
# +-1: full-scale noise), so the build rescales that convolution to this RMS, about -26 dBFS: a quiet murmur whose
# peaks stay well inside [-1, 1]. Measured on random codes as the talker would send them.
DEMO_SPEECH_RMS = 0.05
DEMO_CALIBRATION_FRAMES = 50  # 4 s of codec frames at 12.5 Hz: enough samples for a stable mean and RMS
DEMO_NOTICE = ("thinktalk demo checkpoint: the Qwen3-Omni structure with RANDOM weights - its words are "
               "meaningless. Pass --model DIR to use a real checkpoint.")


DEMO_QUESTION = "What do you hear and see?"
# The demo's reply: short and bounded, so that the first command a new user types ends in seconds. Random weights
# never say codec EOS, so the speech is capped too (the runaway guard alone would allow 1 s per token + 5 s).
DEMO_MAX_TOKENS = 32
DEMO_SPEECH_SECONDS = 4.0
DEMO_TONE_SECONDS, DEMO_TONE_HZ, DEMO_IMAGE_SIZE = 2.0, 440.0, 64


def demo_messages(text: str | None = None) -> list[dict]:
    """A user turn with a synthetic tone, a noise image and a question: exercises both encoders."""
    import numpy as np
    from PIL import Image

    from .processing.audio import AudioFeatureConfig

    rate = AudioFeatureConfig().sampling_rate
    t = np.arange(int(DEMO_TONE_SECONDS * rate)) / rate
    tone = (0.4 * np.sin(2 * np.pi * DEMO_TONE_HZ * t)).astype(np.float32)
    pixels = np.random.default_rng(DEMO_SEED).integers(0, 256, (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "audio", "audio": (tone, rate)},
                                         {"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": text or DEMO_QUESTION}]}]


def demo_config() -> dict:
    return json.loads(resources.files("thinktalk").joinpath("assets/demo_config.json").read_text())


def default_cache_dir() -> Path:
    base = os.environ.get("THINKTALK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "thinktalk"
    return Path(base).expanduser()


DEMO_FAMILIES = ("qwen3", "qwen2.5")  # thinktalk demo --family: Qwen3-Omni (the default) or Qwen2.5-Omni


def ensure_demo_checkpoint(cache_dir: Path | None = None, family: str = "qwen3") -> Path:
    """The demo checkpoint's directory, built on first use (`family`: one of DEMO_FAMILIES)."""
    from .demo_qwen2_5 import QWEN2_5_DEMO_VERSION, write_qwen2_5_demo_checkpoint

    assert family in DEMO_FAMILIES, family
    name = f"demo-v{DEMO_VERSION}" if family == "qwen3" else f"demo-qwen2.5-v{QWEN2_5_DEMO_VERSION}"
    write = write_demo_checkpoint if family == "qwen3" else write_qwen2_5_demo_checkpoint
    target = (cache_dir or default_cache_dir()) / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def write_demo_checkpoint(directory: Path) -> None:
    config = demo_config()
    model = OmniModel(parse_config(config), audio_output=True)
    randomize_(model, DEMO_SEED)
    quiet_vocoder_(model.code2wav, DEMO_SEED, DEMO_SPEECH_RMS)
    state = model.state_dict()
    tensors = {}
    for key, source in sorted(checkpoint_layout(model).items()):  # back to the released per-expert layout
        tensors[key] = state[source.target][source.index].contiguous().clone()
    build_qwen_tokenizer_files(directory)
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))  # written last: marks completeness


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights strong enough to give varied tokens and audible audio: matrices N(0, 1/sqrt(fan_in)),
    embeddings N(0, 1), norm scales near 1, other vectors small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:]) if param.dim() > 3 else param.shape[-1]
                std = 1.0 if "embed" in name else 1.0 / math.sqrt(fan_in)
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "norm" in name or name.endswith("scale"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def quiet_vocoder_(code2wav: Code2Wav, seed: int, rms: float) -> None:
    """Rescales Code2Wav's last convolution so that its output (before the final clamp) has mean 0 and RMS `rms`
    on random codes. The convolution is linear, so y' = s * (y - b) + b' with s = rms / std(y) and
    b' = s * (b - mean(y)) gives exactly that; everything before it is untouched."""
    generator = torch.Generator().manual_seed(seed)
    cfg = code2wav.cfg
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, DEMO_CALIBRATION_FRAMES), generator=generator)
    last = code2wav.decoder[-1].conv
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _module, _inputs, output: captured.append(output.detach()))
    try:
        with torch.no_grad():
            code2wav.decode(codes)
    finally:
        hook.remove()
    (output,) = captured  # (1, 1, samples): the waveform before the clamp
    mean, std = output.mean(), output.std()
    assert std > 0, "random weights gave a constant waveform"
    scale = rms / std
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.copy_(scale * (last.bias - mean))
