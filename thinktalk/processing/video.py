"""Video files -> sampled RGB frames, with the container's declarations checked before any frame is decoded.

Sources: a path, the video's bytes, or a base64 data URL (any media type). The first video stream's packets are
counted by demuxing (no decoding), so its length, rate and frame size are known first: a frame size over
`max_decode_pixels` or a length over `max_seconds` is refused before any decode. Then only the sampled frames
(processing/vision.py's `sample_count`, at cfg.video_fps) are kept. Every PyAV failure is a VisionInputError
naming the input.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .vision import (DATA_URL_PREFIX, VisionInputError, VisionProcessorConfig, _cause, _check_pixels,
                     _decode_data_url, _describe, sample_count)

# Besides its FFmpegErrors, PyAV raises these for streams it cannot convert (odd pixel formats, absurd rates).
PYAV_VIDEO_ERRORS = (IndexError, KeyError, ValueError, TypeError, OverflowError, ZeroDivisionError)


def _sample_indices(total_frames: int, native_fps: float, cfg: VisionProcessorConfig) -> list[int]:
    count = sample_count(total_frames, native_fps, cfg)
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container declares, read without decoding a frame."""

    frames: int  # demuxed packets of the first video stream that carry data
    fps: float  # its average frame rate
    width: int
    height: int
    audio_seconds: float | None  # the first audio stream's declared length; None without one (or undeclared)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def _video_opener(source: Any, name: str) -> Callable[[], Any]:
    """Something PyAV can open afresh on each call: the file's path, or a new reader over the video's bytes."""
    if isinstance(source, (bytes, bytearray)) or (isinstance(source, str) and source.startswith(DATA_URL_PREFIX)):
        data = _decode_data_url(source, "") if isinstance(source, str) else bytes(source)
        if not data:
            raise VisionInputError(f"{name}: empty input")
        return lambda: io.BytesIO(data)
    if isinstance(source, str) and "://" in source:
        raise VisionInputError(f"{name}: URLs are not fetched; pass a local path, bytes or data URL")
    if not isinstance(source, (str, Path)):
        raise VisionInputError(f"{type(source).__name__} video: expected a path, bytes, a data URL or frames")
    try:
        is_file = Path(source).is_file()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise VisionInputError(f"{name}: cannot open the video file ({_cause(exc)})") from None
    if not is_file:
        raise VisionInputError(f"{name}: no such video file")
    return lambda: str(source)


def _probe(av: Any, opener: Callable[[], Any], name: str) -> VideoInfo:
    """The first video stream's packets counted (demuxed, not decoded), its rate and frame size, the audio length."""
    with av.open(opener()) as container:
        if not container.streams.video:
            return VideoInfo(0, 0.0, 0, 0, None)
        stream = container.streams.video[0]
        native_fps = float(stream.average_rate) if stream.average_rate else 0.0
        if stream.codec_context is None:  # a codec this FFmpeg build cannot decode (or a corrupt codec id)
            raise VisionInputError(f"{name}: no decoder for its video stream")
        width, height = stream.codec_context.width, stream.codec_context.height
        audio_seconds = None
        if container.streams.audio:
            track = container.streams.audio[0]
            if track.duration is not None and track.time_base:
                audio_seconds = float(track.duration * track.time_base)
        frames = sum(1 for packet in container.demux(stream) if packet.size)
    return VideoInfo(frames, native_fps, width, height, audio_seconds)


def _decode_selected(av: Any, opener: Callable[[], Any], wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode the first video stream keeping only frames whose index is in `wanted`; also the decoded count."""
    kept: dict[int, np.ndarray] = {}
    total = 0
    with av.open(opener()) as container:
        for total, frame in enumerate(container.decode(video=0), start=1):
            if total - 1 in wanted:
                kept[total - 1] = frame.to_ndarray(format="rgb24")
    return kept, total


def _check_video(info: VideoInfo, name: str, cfg: VisionProcessorConfig, max_seconds: float | None) -> None:
    if info.frames < 1 or info.fps <= 0:
        raise VisionInputError(f"{name}: no video frames or no frame rate")
    if info.width and info.height:  # some containers leave the size to the first decoded frame
        _check_pixels(info.width, info.height, f"{name} (its frame size)", cfg)
    if max_seconds is not None and info.seconds > max_seconds:
        raise VisionInputError(f"{name}: {info.seconds:.1f} s of video is over the limit of {max_seconds:g} s")


def probe_video(source: Any) -> VideoInfo:
    """A video (path, bytes or data URL) as its container declares it; VisionInputError if PyAV cannot read it."""
    import av  # optional dependency (the `media` extra)

    name = _describe(source)
    opener = _video_opener(source, name)
    try:
        return _probe(av, opener, name)
    except VisionInputError:
        raise
    except PYAV_VIDEO_ERRORS + (av.error.FFmpegError,) as exc:
        raise VisionInputError(f"{name}: cannot read video ({_cause(exc)})") from None


def load_video(source: str | Path | bytes, cfg: VisionProcessorConfig | None = None,
               max_seconds: float | None = None) -> tuple[list[Image.Image], float]:
    """Decode a video (path, bytes or base64 data URL) with PyAV and sample it at cfg.video_fps -> (RGB frames,
    real sampled fps).

    Before any frame is decoded, its container's frame size must be within cfg.max_decode_pixels and its length
    within `max_seconds`. Indices are spread evenly from the first to the last frame; the sampled fps is
    count / total_frames * native_fps, which is what the frame timing really is. Frames are counted from the
    demuxed packets first so that only the sampled frames are held in memory; if decoding yields a different count
    the sampling is planned again on the decoded count.
    """
    import av  # optional dependency (the `media` extra)

    cfg = cfg or VisionProcessorConfig()
    name = _describe(source)
    opener = _video_opener(source, name)
    try:
        info = _probe(av, opener, name)
        _check_video(info, name, cfg, max_seconds)
        total, native_fps = info.frames, info.fps
        indices = _sample_indices(total, native_fps, cfg)
        kept, decoded = _decode_selected(av, opener, set(indices))
        if decoded != total:
            total = decoded
            indices = _sample_indices(total, native_fps, cfg)
            kept, decoded = _decode_selected(av, opener, set(indices))
    except VisionInputError:
        raise
    except PYAV_VIDEO_ERRORS + (av.error.FFmpegError,) as exc:
        raise VisionInputError(f"{name}: cannot decode video ({_cause(exc)})") from None
    frames = [Image.fromarray(kept[i]) for i in indices]
    return frames, len(indices) / total * native_fps
