"""The media of bench/hostile_corpus.py: Pillow's own test images, and a generated audio and video corpus.

    pillow_images(cache)   every file under Tests/images of the installed Pillow's source distribution, which
                           `pip download --no-binary :all:` fetches from the registry once into `cache`
    audio_corpus()         a tone in every container and codec soundfile and PyAV write here, each also truncated
                           and with its header bytes flipped, plus tests/hostile_media.py's AUDIO
    video_corpus(folder)   clips in several codecs, sizes, rates and lengths, with and without sound, each also
                           truncated and with its header bytes flipped, plus tests/hostile_media.py's VIDEOS

Each is a list of Case(kind, name, data). The corruptions are deterministic (a seeded generator).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hostile_media import AUDIO, IMAGES, VIDEOS  # noqa: E402
from media import tone, write_video  # noqa: E402

SEED = 12
HEADER_BYTES = 64  # corrupted: the first bytes of a file, where every container keeps its header
FLIPPED_BYTES = 8
TRUNCATIONS = (0.1, 0.5, 0.9)  # keep this fraction of the file
SOUNDFILE_ENCODINGS = [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
                       ("WAV", "PCM_U8"), ("WAV", "ULAW"), ("WAV", "ALAW"), ("WAV", "IMA_ADPCM"),
                       ("WAV", "MS_ADPCM"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"),
                       ("OGG", "OPUS"), ("AIFF", "PCM_16"), ("CAF", "PCM_16"), ("W64", "PCM_16"), ("RF64", "PCM_16"),
                       ("AU", "PCM_16")]
PYAV_ENCODINGS = [("mp3", "libmp3lame", "s16p"), ("adts", "aac", "fltp"), ("ogg", "libopus", "s16"),
                  ("webm", "libopus", "s16"), ("ac3", "ac3", "fltp"), ("matroska", "flac", "s16")]
AUDIO_RATES = (8000, 16000, 22050, 44100, 48000, 96000)
VIDEO_SHAPES = [("mpeg4", (64, 64), 4, 1.0, True), ("mpeg4", (320, 240), 30, 2.0, True),
                ("libx264", (128, 96), 10, 2.0, False), ("mpeg4", (16, 16), 1, 5.0, True),
                ("libvpx", (96, 64), 8, 1.5, False), ("mjpeg", (64, 48), 5, 1.0, False)]


@dataclass(frozen=True)
class Case:
    kind: str  # "image", "audio" or "video"
    name: str
    data: bytes


def pillow_images(cache: Path) -> list[Case]:
    import PIL

    version = PIL.__version__
    archive = next(cache.glob(f"pillow-{version}.tar.gz"), None)
    if archive is None:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"pillow=={version}", "-d", str(cache)], check=True, stdout=subprocess.DEVNULL)
        archive = next(cache.glob(f"pillow-{version}.tar.gz"))
    cases = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and "/Tests/images/" in member.name:
                data = tar.extractfile(member).read()
                cases.append(Case("image", member.name.split("/Tests/images/", 1)[1], data))
    return cases + [Case("image", f"generated/{name}", make()) for name, make in sorted(IMAGES.items())]


def corrupted(case: Case) -> list[Case]:
    """The case truncated at several lengths, and with bytes of its header flipped."""
    rng = np.random.default_rng([SEED, len(case.data)])
    out = [Case(case.kind, f"{case.name} cut {keep:.0%}", case.data[:int(len(case.data) * keep)])
           for keep in TRUNCATIONS]
    flipped = bytearray(case.data)
    for index in rng.choice(min(HEADER_BYTES, len(flipped)), FLIPPED_BYTES, replace=False):
        flipped[index] ^= 0xFF
    return out + [Case(case.kind, f"{case.name} header flipped", bytes(flipped))]


def _soundfile_bytes(wave: np.ndarray, rate: int, container: str, subtype: str) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def _pyav_bytes(wave: np.ndarray, rate: int, container: str, codec: str, sample_format: str) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=48000 if codec == "libopus" else rate, layout="mono")
        resampler = av.AudioResampler(format=sample_format, layout="mono", rate=stream.rate)
        frame = av.AudioFrame.from_ndarray(wave[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for piece in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def audio_corpus() -> list[Case]:
    clean = []
    for rate in AUDIO_RATES:
        wave = tone(1.5, rate)
        for container, subtype in SOUNDFILE_ENCODINGS:
            try:
                clean.append(Case("audio", f"{container}/{subtype} {rate} Hz", _soundfile_bytes(wave, rate,
                                                                                                container, subtype)))
            except Exception:  # noqa: BLE001 (libsndfile refuses some pairs, e.g. Opus at 22.05 kHz: not a case)
                continue
        for container, codec, sample_format in PYAV_ENCODINGS:
            try:
                data = _pyav_bytes(wave, rate, container, codec, sample_format)
            except Exception:  # noqa: BLE001 (an encoder that refuses a rate: not a case)
                continue
            clean.append(Case("audio", f"{container}/{codec} {rate} Hz", data))
    corrupt = [c for case in clean for c in corrupted(case)]
    return clean + corrupt + [Case("audio", f"generated/{name}", make()) for name, make in sorted(AUDIO.items())]


def video_corpus(folder: Path) -> list[Case]:
    clean = []
    for index, (codec, size, fps, seconds, sound) in enumerate(VIDEO_SHAPES):
        path = folder / f"clip-{index}.{'webm' if codec == 'libvpx' else 'mkv' if codec == 'mjpeg' else 'mp4'}"
        try:
            _write_clip(path, codec, size, fps, seconds, sound)
        except Exception:  # noqa: BLE001 (a codec this PyAV build lacks: not a case)
            continue
        clean.append(Case("video", f"{codec} {size[0]}x{size[1]} {fps} fps {seconds} s sound={sound}",
                          path.read_bytes()))
    corrupt = [c for case in clean for c in corrupted(case)]
    return clean + corrupt + [Case("video", f"generated/{name}", make(folder)) for name, make in sorted(VIDEOS.items())]


def _write_clip(path: Path, codec: str, size: tuple[int, int], fps: int, seconds: float, sound: bool) -> None:
    if codec == "mpeg4":
        write_video(path, seconds=seconds, fps=fps, size=size, audio_rate=16000 if sound else None)
        return
    import av

    rng = np.random.default_rng(SEED)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for index in range(int(seconds * fps)):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
