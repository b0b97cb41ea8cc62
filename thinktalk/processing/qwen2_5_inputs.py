"""Qwen2.5-Omni's input preprocessing as pure functions: image/video patches, audio features, placeholder counts.

Images and videos: Qwen2-VL's processor, which is Qwen3-Omni's with 14-px patches (one token per 28x28 pixels)
and CLIP's mean and std; the resizing (`smart_resize` to multiples of 28), the patch layout and the video sampling
are processing/vision.py's, given `QWEN2_5_VISION`.

Audio: Whisper's 128-bin log-mel (processing/audio.py), as the Qwen2.5-Omni processor calls its extractor: padded
with zeros to the extractor's full length (padding="max_length") and cut to its attention mask, so a clip of n
samples gives ceil(n / 160) frames and its last frames see zeros past the end rather than a reflection. thinktalk
pads only as far as those frames can see (the result is the same) and never truncates: the reference's extractor
cuts a clip at its chunk_length (300 s in the released preprocessor config), thinktalk encodes any length.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config_qwen2_5 import audio_token_count  # noqa: F401  (re-exported: placeholder counts)
from .audio import AudioFeatureConfig, log_mel_features
from .vision import VisionProcessorConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The released preprocessor_config.json's image numbers (Qwen2-VL's, with Qwen-Omni's pixel bounds); the video
# numbers (2 fps, 4..768 frames, per-frame pixel bounds 128 and 768 tokens' worth) are Qwen's helper's, as for Qwen3.
QWEN2_5_VISION = VisionProcessorConfig(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3_136,
                                       max_pixels=12_845_056, image_mean=CLIP_MEAN, image_std=CLIP_STD)
QWEN2_5_AUDIO = AudioFeatureConfig(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)


def audio_frames(samples: int, cfg: AudioFeatureConfig = QWEN2_5_AUDIO) -> int:
    """Mel frames of a clip of `samples` samples: the extractor's attention mask counts every hop that starts
    inside the clip."""
    return math.ceil(samples / cfg.hop_length)


def qwen2_5_audio_features(waveform, cfg: AudioFeatureConfig = QWEN2_5_AUDIO) -> torch.Tensor:
    """A mono waveform at 16 kHz -> (128, ceil(n / 160)) float32 log-mel, as the reference's processor gives it."""
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"waveform of shape {wave.shape}: expected a 1-D mono waveform")
    frames = audio_frames(wave.shape[0], cfg)
    # frame k's window covers samples [k * hop - n_fft / 2, k * hop + n_fft / 2): zeros beyond the clip up to the last
    # frame's window end, plus one hop so the extended clip still holds all `frames` frames
    padded = np.concatenate([wave, np.zeros(cfg.n_fft // 2 + cfg.hop_length, dtype=np.float32)])
    return log_mel_features(padded, cfg)[:, :frames]
