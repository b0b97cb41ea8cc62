"""Media made at test time: tones, noise images, and small mp4 videos with an optional audio track (PyAV)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image


def tone(seconds: float, rate: int = 16000, hz: float = 440.0, seed: int = 0) -> np.ndarray:
    """A tone plus a little noise (so the mel features are not degenerate), float32 in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    """A tone as a 16-bit mono WAV file, in memory."""
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((tone(seconds, rate) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_video(path: Path, seconds: float, fps: int = 4, size: tuple[int, int] = (64, 64),
                audio_rate: int | None = 16000, seed: int = 0) -> Path:
    """An mpeg4 clip of noise frames; with `audio_rate`, an aac track of a tone of the same length."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        packets = []
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8),
                                               format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            packets += video.encode(frame)
        packets += video.encode(None)
        if audio_rate is not None:
            stream = container.add_stream("aac", rate=audio_rate, layout="mono")
            wave = tone(seconds, audio_rate, seed=seed)
            size_ = stream.codec_context.frame_size or 1024
            for start in range(0, len(wave), size_):
                chunk = wave[None, start:start + size_]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = audio_rate, start, Fraction(1, audio_rate)
                packets += stream.encode(frame)
            packets += stream.encode(None)
        for packet in packets:
            container.mux(packet)
    return path
