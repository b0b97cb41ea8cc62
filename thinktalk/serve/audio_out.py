"""The spoken reply as bytes: wav and pcm16 always (16-bit little-endian), flac / mp3 / opus when the installed
soundfile (libsndfile) can write them. Streaming sends pcm16 chunks; a `wav` stream opens with a header whose
sizes are 0xFFFFFFFF (the usual form of a WAV of unknown length) and then the same pcm16 chunks."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np

from ..processing.wav import to_pcm16

SOUNDFILE_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm16": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg"}


def encode(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm16":
        return to_pcm16(samples)
    if fmt == "wav":
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(sample_rate)
            out.writeframes(to_pcm16(samples))
        return buffer.getvalue()
    import soundfile

    container, subtype = SOUNDFILE_FORMATS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples.astype(np.float32), -1, 1), sample_rate, format=container,
                    subtype=subtype)
    return buffer.getvalue()


def supported_formats(sample_rate: int) -> tuple[str, ...]:
    """The formats this installation can write, found by encoding a short silence."""
    found = ["wav", "pcm16"]
    try:
        import soundfile
    except ImportError:
        return tuple(found)
    available = soundfile.available_subtypes
    for name, (container, subtype) in SOUNDFILE_FORMATS.items():
        if container in soundfile.available_formats() and subtype in available(container):
            try:
                encode(np.zeros(sample_rate // 10, dtype=np.float32), sample_rate, name)
            except (RuntimeError, TypeError, ValueError, soundfile.LibsndfileError):
                continue  # this libsndfile build lists the format but cannot write it at this rate
            found.append(name)
    return tuple(found)


def streaming_wav_header(sample_rate: int) -> bytes:
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))
