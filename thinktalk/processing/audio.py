"""Audio input: decode any supported source to mono float32 at the model's rate, and Whisper-style log-mel features.

Sources accepted by `load_audio`:
- a path (str or Path) to an audio or video file;
- raw encoded bytes (bytes, bytearray, memoryview);
- a data URL string, `data:audio/wav;base64,...` (a non-base64 data URL is percent-decoded);
- a tuple `(array, sample_rate)`: a 1-D array, or a 2-D array whose SMALLER axis is the channel axis, so both
  channels-last `(samples, channels)` (soundfile's layout) and channels-first `(channels, samples)` (torchaudio's)
  work; a square 2-D array is rejected as ambiguous. Integer PCM is scaled to [-1, 1); torch tensors are accepted.

WAV, FLAC, Ogg, AIFF, W64, RF64 and CAF (recognised by their magic bytes) decode with soundfile; everything else
(mp3, m4a/aac, opus in Matroska/WebM, the audio track of a video) decodes with PyAV. When soundfile cannot read a
file it recognised, PyAV is tried and, if that fails too, both errors are reported.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from thinktalk.config_reader import FieldReader

# Slaney's mel scale (Auditory Toolbox): linear below 1 kHz at 200/3 Hz per mel, logarithmic above it.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0

# Band-limited resampler: Kaiser-windowed sinc, taps spanning this many zero crossings on each side.
_SINC_ZERO_CROSSINGS = 16
_SINC_ROLLOFF = 0.945  # cutoff as a fraction of the lower Nyquist frequency, leaves room for the transition band
_KAISER_BETA = 8.6
_RESAMPLE_ROWS = 1 << 16  # output rows (of `up` samples each) computed per block, bounding the working memory

# Magic bytes of the containers soundfile (libsndfile) reads.
_SOUNDFILE_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b"caff", b"riff")


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


class AudioInputError(ValueError):
    """An audio input cannot be used: missing, empty, undecodable, too short, or not finite. Names the input."""


# ----------------------------------------------------------------------------------------------------------- loading


def describe_source(source: Any) -> str:
    """A short human name for an audio input, used in every error message."""
    if isinstance(source, str) and source.startswith("data:"):
        return f"data URL {source[:48]!r}{'...' if len(source) > 48 else ''}"
    if isinstance(source, (str, os.PathLike)):
        return f"audio file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(source)} bytes)"
    if isinstance(source, tuple) and len(source) == 2:
        shape = tuple(getattr(source[0], "shape", ()))
        return f"audio array of shape {shape} at {source[1]!r} Hz"
    return f"audio input of type {type(source).__name__}"


def load_audio(source: Any, sample_rate: int | None = None, cfg: AudioFeatureConfig | None = None) -> np.ndarray:
    """Decode `source` (see the module docstring) to a 1-D float32 mono waveform at `sample_rate` Hz.

    `sample_rate` is the rate to deliver; by default the model's (`cfg.sampling_rate`, 16 kHz). Channels are
    mixed by their mean, then the waveform is resampled with a band-limited (windowed-sinc) resampler.
    """
    target = sample_rate if sample_rate is not None else (cfg or AudioFeatureConfig()).sampling_rate
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"sample_rate must be a positive integer, got {target!r}")
    name = describe_source(source)
    channels, rate = _decode(source, name)
    if channels.shape[1] < 2:
        raise AudioInputError(f"{name}: decoded to {channels.shape[1]} sample(s); at least 2 are needed")
    if not np.isfinite(channels).all():
        raise AudioInputError(f"{name}: contains NaN or infinite samples")
    mono = channels[0] if channels.shape[0] == 1 else channels.mean(axis=0, dtype=np.float32)
    return resample(mono, rate, target)


def _decode(source: Any, name: str) -> tuple[np.ndarray, int]:
    """Any source -> ((channels, samples) float32, sample rate)."""
    if isinstance(source, tuple):
        return _from_array(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), name)
    if isinstance(source, str) and source.startswith("data:"):
        return _decode_bytes(_parse_data_url(source, name), name)
    if isinstance(source, (str, os.PathLike)):
        return _decode_path(Path(source), name)
    raise AudioInputError(f"{name}: unsupported audio source; give a path, bytes, a data URL or (array, rate)")


def _decode_path(path: Path, name: str) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise AudioInputError(f"{name}: no such file")
    if not path.is_file():
        raise AudioInputError(f"{name}: not a regular file")
    if path.stat().st_size == 0:
        raise AudioInputError(f"{name}: the file is empty")
    with path.open("rb") as handle:
        head = handle.read(4)
    return _decode_container(lambda: str(path), head, name)


def _decode_bytes(data: bytes, name: str) -> tuple[np.ndarray, int]:
    if not data:
        raise AudioInputError(f"{name}: no data (0 bytes)")
    return _decode_container(lambda: io.BytesIO(data), data[:4], name)


def _parse_data_url(url: str, name: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise AudioInputError(f"{name}: malformed data URL (no ',' between the header and the data)")
    if header.split(";")[-1].strip().lower() != "base64":
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as err:
        raise AudioInputError(f"{name}: invalid base64 payload ({err})") from err


def _decode_container(open_source, head: bytes, name: str) -> tuple[np.ndarray, int]:
    """Decode with soundfile when the magic bytes say it can, otherwise (or when it fails) with PyAV."""
    soundfile_error = None
    if head.startswith(_SOUNDFILE_MAGIC):
        sf = _require("soundfile")
        try:
            data, rate = sf.read(open_source(), dtype="float32", always_2d=True)
            return np.ascontiguousarray(data.T), int(rate)
        except sf.SoundFileError as err:
            soundfile_error = err
    try:
        return _decode_with_pyav(open_source(), name)
    except _require("av").FFmpegError as err:
        also = f"; soundfile: {soundfile_error}" if soundfile_error is not None else ""
        raise AudioInputError(f"{name}: cannot decode audio (PyAV: {err}{also})") from err


def _decode_with_pyav(source, name: str) -> tuple[np.ndarray, int]:
    av = _require("av")
    with av.open(source, mode="r") as container:
        if not container.streams.audio:
            raise AudioInputError(f"{name}: the container has no audio stream")
        stream = container.streams.audio[0]
        pieces, rate = [], stream.codec_context.sample_rate
        for frame in container.decode(stream):
            pieces.append(_frame_samples(frame))
            rate = frame.sample_rate
    if not pieces:
        raise AudioInputError(f"{name}: the audio stream decoded to no samples")
    if len({piece.shape[0] for piece in pieces}) != 1:
        raise AudioInputError(f"{name}: the channel count changes inside the audio stream")
    if not rate:
        raise AudioInputError(f"{name}: the audio stream has no sample rate")
    return np.concatenate(pieces, axis=1), int(rate)


def _frame_samples(frame) -> np.ndarray:
    """One decoded PyAV frame -> (channels, samples) float32."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        array = array.reshape(-1, channels).T
    return _pcm_to_float(array, f"PyAV frame of format {frame.format.name}")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"decoding audio needs `{module}`: pip install 'thinktalk[media]'") from err


def _from_array(source: tuple, name: str) -> tuple[np.ndarray, int]:
    array, rate = source
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise AudioInputError(f"{name}: the sample rate must be a positive integer")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[None, :]
    elif array.ndim == 2:
        if array.shape[0] == array.shape[1] and array.shape[0] > 1:
            raise AudioInputError(f"{name}: a square 2-D array is ambiguous (which axis is channels?)")
        if array.shape[0] > array.shape[1]:  # channels-last -> channels-first
            array = array.T
    else:
        raise AudioInputError(f"{name}: expected a 1-D or 2-D array, got {array.ndim}-D")
    return _pcm_to_float(array, name), int(rate)


def _pcm_to_float(array: np.ndarray, name: str) -> np.ndarray:
    """Float arrays pass through as float32; integer PCM is scaled to [-1, 1)."""
    kind = array.dtype.kind
    if kind == "f":
        return np.ascontiguousarray(array, dtype=np.float32)
    if kind == "i":
        scale = float(2 ** (8 * array.dtype.itemsize - 1))
        return (array.astype(np.float64) / scale).astype(np.float32)
    if kind == "u":
        middle = float(2 ** (8 * array.dtype.itemsize - 1))
        return ((array.astype(np.float64) - middle) / middle).astype(np.float32)
    raise AudioInputError(f"{name}: unsupported sample type {array.dtype}")


# -------------------------------------------------------------------------------------------------------- resampling


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D float32 waveform (Kaiser-windowed sinc, polyphase).

    The output has round(len * target_rate / orig_rate) samples; output sample k sits at input time
    k * orig_rate / target_rate. Polyphase: for each phase a matrix-vector product over strided windows, in blocks, so
    memory is linear in the length.
    """
    common = math.gcd(orig_rate, target_rate)
    up, down = target_rate // common, orig_rate // common
    if up == down:
        return np.array(waveform, dtype=np.float32)
    out_len = round(Fraction(len(waveform) * up, down))
    table, half = _polyphase_table(up, down)
    rows = -(-out_len // up)  # output sample k = row * up + phase index r
    signal = torch.from_numpy(np.pad(np.asarray(waveform, dtype=np.float32), (half, half + 2 * down + 1)))
    out = np.empty(rows * up, dtype=np.float32)
    for first in range(0, rows, _RESAMPLE_ROWS):
        count = min(_RESAMPLE_ROWS, rows - first)
        for r in range(up):  # outputs r, r + up, ... start at input r * down // up and advance by `down`
            base, phase = divmod(r * down, up)
            start = first * down + base + 1  # first tap of the first row (signal is padded by `half`)
            windows = signal[start:start + (count - 1) * down + 2 * half].unfold(0, 2 * half, down)
            out[first * up + r:(first + count) * up:up] = (windows @ table[phase]).numpy()
    return out[:out_len]


def _polyphase_table(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Filter taps for each of the `up` fractional phases: (up, 2 * half) float32, each row summing to 1."""
    cutoff = _SINC_ROLLOFF * min(1.0, up / down)  # as a fraction of the input's Nyquist frequency
    half = math.ceil(_SINC_ZERO_CROSSINGS / cutoff)
    offsets = np.arange(-half + 1, half + 1, dtype=np.float64)[None, :]
    distance = offsets - (np.arange(up, dtype=np.float64) / up)[:, None]  # tap time minus output time
    ratio = np.clip(distance / half, -1.0, 1.0)
    window = np.i0(_KAISER_BETA * np.sqrt(1.0 - ratio**2)) / np.i0(_KAISER_BETA)
    table = cutoff * np.sinc(cutoff * distance) * window
    table /= table.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return torch.from_numpy(table.astype(np.float32)), half


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
