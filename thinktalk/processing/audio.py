"""Audio input: decode any supported source to mono float32 at the model's rate, and Whisper-style log-mel features.

Sources accepted by `load_audio`:
- a path (str or Path) to an audio or video file;
- raw encoded bytes (bytes, bytearray, memoryview);
- a data URL string, `data:audio/wav;base64,...` (a non-base64 data URL is percent-decoded);
- a tuple `(array, sample_rate)`: a 1-D array, or a 2-D array whose SMALLER axis is the channel axis, so both
  channels-last `(samples, channels)` (soundfile's layout) and channels-first `(channels, samples)` (torchaudio's)
  work; a square 2-D array is rejected as ambiguous. Integer PCM is scaled to [-1, 1); torch tensors are accepted.

Decoding, and the limits checked from the header before it (sample-rate range, `max_seconds`), live in
processing/audio_decode.py; the resampler (bounded working memory whatever the rates) in processing/resample.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config_reader import FieldReader
from .audio_decode import AudioInputError, AudioTooLong, decode_audio, describe_source
from .resample import resample

__all__ = ["AudioFeatureConfig", "AudioInputError", "AudioTooLong", "describe_source", "load_audio", "log_mel_features",
           "resample"]

# Slaney's mel scale (Auditory Toolbox): linear below 1 kHz at 200/3 Hz per mel, logarithmic above it.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


@dataclass(frozen=True)
class AudioFeatureConfig:
    """The feature extractor's numbers (the checkpoint's `preprocessor_config.json`, Whisper's algorithm)."""

    feature_size: int = 128  # mel bins
    sampling_rate: int = 16000
    hop_length: int = 160  # 10 ms
    n_fft: int = 400  # 25 ms window
    padding_value: float = 0.0  # value a batch pads waveforms with
    min_frequency: float = 0.0  # the mel filterbank's range (Whisper fixes 0..8000 Hz)
    max_frequency: float = 8000.0
    mel_floor: float = 1e-10  # log10 is taken of max(mel power, mel_floor)
    dynamic_range: float = 8.0  # log10 values are clamped to (clip maximum - dynamic_range)
    log_offset: float = 4.0  # features are (log10 + log_offset) / log_scale
    log_scale: float = 4.0

    def __post_init__(self) -> None:
        for name in ("feature_size", "sampling_rate", "hop_length", "n_fft"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AudioFeatureConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.min_frequency < self.max_frequency <= self.sampling_rate / 2:
            raise ValueError(f"AudioFeatureConfig: need 0 <= min_frequency < max_frequency <= sampling_rate / 2, "
                             f"got {self.min_frequency}, {self.max_frequency}, {self.sampling_rate}")

    @property
    def num_frequency_bins(self) -> int:
        return self.n_fft // 2 + 1

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> AudioFeatureConfig:
        """Read `preprocessor_config.json` from a checkpoint directory; defaults for the file or any field absent."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls()
        fields = FieldReader(json.loads(file.read_text(encoding="utf-8")), file)
        d = cls()
        return cls(
            feature_size=fields.int("feature_size", d.feature_size, minimum=1),
            sampling_rate=fields.int("sampling_rate", d.sampling_rate, minimum=1),
            hop_length=fields.int("hop_length", d.hop_length, minimum=1),
            n_fft=fields.int("n_fft", d.n_fft, minimum=2),
            padding_value=fields.float("padding_value", d.padding_value),
        )


# ----------------------------------------------------------------------------------------------------------- loading


def load_audio(source: Any, sample_rate: int | None = None, cfg: AudioFeatureConfig | None = None, *,
               max_seconds: float | None = None) -> np.ndarray:
    """Decode `source` (see the module docstring) to a 1-D float32 mono waveform at `sample_rate` Hz.

    `sample_rate` is the rate to deliver; by default the model's (`cfg.sampling_rate`, 16 kHz). Channels are
    mixed by their mean, then the waveform is resampled with a band-limited (windowed-sinc) resampler. Audio longer
    than `max_seconds` is refused (AudioTooLong) from its header when it says, else as soon as decoding passes it.
    """
    target = sample_rate if sample_rate is not None else (cfg or AudioFeatureConfig()).sampling_rate
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"sample_rate must be a positive integer, got {target!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
    name = describe_source(source)
    channels, rate = decode_audio(source, name, max_seconds)
    if channels.shape[1] < 2:
        raise AudioInputError(f"{name}: decoded to {channels.shape[1]} sample(s); at least 2 are needed")
    if not np.isfinite(channels).all():
        raise AudioInputError(f"{name}: contains NaN or infinite samples")
    mono = channels[0] if channels.shape[0] == 1 else channels.mean(axis=0, dtype=np.float32)
    return resample(mono, rate, target)


# ---------------------------------------------------------------------------------------------------------- features


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
    logarithmic = break_mel + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_BREAK_HZ, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    break_mel = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (np.maximum(mel, break_mel) - break_mel))
    return np.where(mel >= break_mel, logarithmic, linear)


def mel_filter_bank(cfg: AudioFeatureConfig) -> np.ndarray:
    """Triangular filters equally spaced on Slaney's mel scale, area-normalised: (frequency bins, mel bins)."""
    bin_hz = np.linspace(0.0, cfg.sampling_rate / 2, cfg.num_frequency_bins)
    mels = np.linspace(_hz_to_mel(cfg.min_frequency), _hz_to_mel(cfg.max_frequency), cfg.feature_size + 2)
    edges = _mel_to_hz(mels)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_hz[:, None] - lower) / (center - lower)
    falling = (upper - bin_hz[:, None]) / (upper - center)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (upper - lower))


def periodic_hann(length: int) -> torch.Tensor:
    """Hann window of `length` points, periodic (DFT-even). Evaluated in float32 as 0.5 - 0.5 cos(n * 2 pi / length),
    which rounds exactly like the reference's window: the low-energy mel bins are sensitive to 1e-7 window errors."""
    n = torch.arange(length, dtype=torch.float32)
    return 0.5 - 0.5 * torch.cos(n * (2.0 * math.pi / length))


def log_mel_features(waveform, cfg: AudioFeatureConfig | None = None, *, frames_per_chunk: int = 4096) -> torch.Tensor:
    """Whisper's log-mel spectrogram of one mono waveform at `cfg.sampling_rate`: (feature_size, frames) float32.

    frames = len(waveform) // hop_length, the reference's valid frames (its centred STFT gives one frame more and
    drops the last). The clip is not truncated or padded to 30 s. The STFT runs `frames_per_chunk` frames at a time,
    so memory is linear in the length; the (max - dynamic_range) clamp is over the whole clip, as in the reference.
    """
    cfg = cfg or AudioFeatureConfig()
    wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    if wave.ndim != 1:
        raise AudioInputError(f"waveform of shape {tuple(wave.shape)}: expected a 1-D mono waveform")
    edge = cfg.n_fft // 2
    if wave.numel() <= edge:
        raise AudioInputError(f"waveform of {wave.numel()} samples: log-mel needs more than n_fft // 2 = {edge} "
                              "samples (the centred STFT reflect-pads by n_fft // 2)")
    if not bool(torch.isfinite(wave).all()):
        raise AudioInputError(f"waveform of {wave.numel()} samples: contains NaN or infinite samples")
    hop, frames = cfg.hop_length, wave.numel() // cfg.hop_length
    if frames == 0:
        raise AudioInputError(f"waveform of {wave.numel()} samples: shorter than one hop ({hop} samples)")
    padded = F.pad(wave[None, None], (edge, edge), mode="reflect")[0, 0]
    window = periodic_hann(cfg.n_fft)
    filters = torch.from_numpy(mel_filter_bank(cfg).astype(np.float32))
    features = torch.empty(cfg.feature_size, frames)
    for start in range(0, frames, frames_per_chunk):
        stop = min(start + frames_per_chunk, frames)
        segment = padded[start * hop:(stop - 1) * hop + cfg.n_fft]
        spectrum = torch.fft.rfft(segment.unfold(0, cfg.n_fft, hop) * window, dim=-1)
        power = spectrum.real.square() + spectrum.imag.square()
        features[:, start:stop] = (power @ filters).clamp_min(cfg.mel_floor).log10().T
    features = torch.maximum(features, features.max() - cfg.dynamic_range)
    return (features + cfg.log_offset) / cfg.log_scale
