"""Audio sources -> ((channels, samples) float32, sample rate), every limit checked from the header before decoding.

Sources: a path, encoded bytes, a data URL, or `(array, sample_rate)` (see processing/audio.py). WAV, FLAC, Ogg,
AIFF, W64, RF64 and CAF (recognised by their magic bytes) decode with soundfile; everything else (mp3, m4a/aac,
opus, the sound track of a video) with PyAV; when soundfile cannot read a file it recognised, PyAV is tried and, if
that fails too, both errors are reported.

Before any sample is decoded: the declared sample rate must lie in [MIN_SOURCE_RATE, MAX_SOURCE_RATE] (a WAV whose
rate field says 1 Hz or 2^31 - 1 is refused, not resampled), and the declared length must be within `max_seconds`.
PyAV's declared durations are estimates, so its samples are also counted as they decode and decoding stops at the
limit. Every failure of soundfile, PyAV or the filesystem is an AudioInputError naming the input.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MediaError

# Sample rates a source may declare, Hz. Nothing below 1 kHz is speech; 384 kHz is the highest rate audio hardware
# records, so a rate field above it is corrupt or hostile. The upper bound also bounds the resampler's filter length.
MIN_SOURCE_RATE = 1_000
MAX_SOURCE_RATE = 384_000
NAME_CHARS = 48  # how much of a data URL an error message quotes

# Magic bytes of the containers soundfile (libsndfile) reads.
SOUNDFILE_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b"caff", b"riff")


class AudioInputError(MediaError):
    """An audio input cannot be used: missing, empty, undecodable, too short, too long, or not finite."""


class AudioTooLong(AudioInputError):
    """The audio (as its header declares it, or as decoded so far) is longer than the limit."""

    def __init__(self, name: str, seconds: float, limit: float, declared: bool):
        how = " (as its header declares)" if declared else ""
        super().__init__(f"{name}: {seconds:.1f} s of audio{how} is over the limit of {limit:g} s")
        self.seconds, self.limit = seconds, limit


def describe_source(source: Any) -> str:
    """A short human name for an audio input, used in every error message."""
    if isinstance(source, str) and source.startswith("data:"):
        return f"data URL {source[:NAME_CHARS]!r}{'...' if len(source) > NAME_CHARS else ''}"
    if isinstance(source, (str, os.PathLike)):
        return f"audio file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"audio bytes ({len(source)} bytes)"
    if isinstance(source, tuple) and len(source) == 2:
        shape = tuple(getattr(source[0], "shape", ()))
        return f"audio array of shape {shape} at {source[1]!r:.32} Hz"
    if isinstance(source, tuple):
        return f"audio tuple of {len(source)} items"
    return f"audio input of type {type(source).__name__}"


def decode_audio(source: Any, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Any source -> ((channels, samples) float32, sample rate); AudioTooLong past `max_seconds` (None: no limit)."""
    if isinstance(source, tuple):
        return _from_array(source, name, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), name, max_seconds)
    if isinstance(source, str) and source.startswith("data:"):
        return _decode_bytes(_parse_data_url(source, name), name, max_seconds)
    if isinstance(source, (str, os.PathLike)):
        return _decode_path(Path(source), name, max_seconds)
    raise AudioInputError(f"{name}: unsupported audio source; give a path, bytes, a data URL or (array, rate)")


def check_rate(rate: int, name: str) -> int:
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioInputError(f"{name}: a sample rate of {rate} Hz is outside the accepted range "
                              f"[{MIN_SOURCE_RATE}, {MAX_SOURCE_RATE}] Hz")
    return int(rate)


def check_length(samples: int, rate: int, name: str, max_seconds: float | None, declared: bool) -> None:
    if max_seconds is not None and samples > max_seconds * rate:
        raise AudioTooLong(name, samples / rate, max_seconds, declared)


def _decode_path(path: Path, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise AudioInputError(f"{name}: not a regular file")
        if info.st_size == 0:
            raise AudioInputError(f"{name}: the file is empty")
        with path.open("rb") as handle:
            head = handle.read(len(SOUNDFILE_MAGIC[0]))
    except FileNotFoundError:
        raise AudioInputError(f"{name}: no such file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name; OSError: too long, no permission
        raise AudioInputError(f"{name}: cannot be opened ({err})") from None
    return _decode_container(lambda: str(path), head, name, max_seconds)


def _decode_bytes(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not data:
        raise AudioInputError(f"{name}: no data (0 bytes)")
    return _decode_container(lambda: io.BytesIO(data), data[:len(SOUNDFILE_MAGIC[0])], name, max_seconds)


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


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"decoding audio needs `{module}`: pip install 'thinktalk[media]'") from err


def _decode_container(open_source, head: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode with soundfile when the magic bytes say it can, otherwise (or when it fails) with PyAV."""
    soundfile_error = None
    if head.startswith(SOUNDFILE_MAGIC):
        sf = _require("soundfile")
        try:
            return _decode_with_soundfile(sf, open_source(), name, max_seconds)
        except AudioInputError:
            raise
        # libsndfile's errors are SoundFileErrors; its Python wrapper raises ValueError / TypeError / RuntimeError
        # for headers it cannot map (channel counts, formats).
        except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OverflowError) as err:
            soundfile_error = err
    av = _require("av")
    try:
        return _decode_with_pyav(av, open_source(), name, max_seconds)
    except AudioInputError:
        raise
    # FFmpeg's errors are FFmpegErrors; PyAV raises ValueError / TypeError for layouts and sample formats it
    # cannot convert, and OverflowError / ZeroDivisionError for absurd header fields.
    except (av.FFmpegError, ValueError, TypeError, IndexError, OverflowError, ZeroDivisionError) as err:
        also = f"; soundfile: {soundfile_error}" if soundfile_error is not None else ""
        raise AudioInputError(f"{name}: cannot decode audio (PyAV: {err}{also})") from err


def _decode_with_soundfile(sf, source, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(source) as audio:
        rate = check_rate(audio.samplerate, name)
        check_length(audio.frames, rate, name, max_seconds, declared=True)
        data = audio.read(dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), rate


def _declared_seconds(av, container, stream) -> float | None:
    """The audio stream's length as the container declares it (an estimate for some formats), or None."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _decode_with_pyav(av, source, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with av.open(source, mode="r") as container:
        if not container.streams.audio:
            raise AudioInputError(f"{name}: the container has no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # a codec this FFmpeg build cannot decode (or a corrupt codec id)
            raise AudioInputError(f"{name}: no decoder for its audio stream")
        rate = stream.codec_context.sample_rate
        if rate:
            check_rate(rate, name)
        declared = _declared_seconds(av, container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise AudioTooLong(name, declared, max_seconds, declared=True)
        pieces, samples = [], 0
        for frame in container.decode(stream):
            rate = check_rate(frame.sample_rate, name)
            pieces.append(_frame_samples(frame))
            samples += pieces[-1].shape[1]
            check_length(samples, rate, name, max_seconds, declared=False)  # the header may have understated it
    if not pieces:
        raise AudioInputError(f"{name}: the audio stream decoded to no samples")
    if len({piece.shape[0] for piece in pieces}) != 1:
        raise AudioInputError(f"{name}: the channel count changes inside the audio stream")
    return np.concatenate(pieces, axis=1), rate


def _frame_samples(frame) -> np.ndarray:
    """One decoded PyAV frame -> (channels, samples) float32."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        array = array.reshape(-1, channels).T
    return _pcm_to_float(array, f"PyAV frame of format {frame.format.name}")


def _from_array(source: tuple, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if len(source) != 2:
        raise AudioInputError(f"{name}: an audio tuple must be (array, sample_rate)")
    array, rate = source
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise AudioInputError(f"{name}: the sample rate must be an integer number of Hz")
    rate = check_rate(int(rate), name)
    if isinstance(array, torch.Tensor):  # float() first: numpy has no bfloat16
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    try:
        array = np.asarray(array)
    except (ValueError, TypeError) as err:  # ragged nested lists, objects numpy cannot hold
        raise AudioInputError(f"{name}: not an array of samples ({err})") from None
    if array.ndim == 1:
        array = array[None, :]
    elif array.ndim == 2:
        if array.shape[0] == array.shape[1] and array.shape[0] > 1:
            raise AudioInputError(f"{name}: a square 2-D array is ambiguous (which axis is channels?)")
        if array.shape[0] > array.shape[1]:  # channels-last -> channels-first
            array = array.T
    else:
        raise AudioInputError(f"{name}: expected a 1-D or 2-D array, got {array.ndim}-D")
    check_length(array.shape[1], rate, name, max_seconds, declared=False)
    return _pcm_to_float(array, name), rate


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
