"""Images and videos -> vision-encoder patches, as Qwen3-Omni's processor lays them out.

Pipeline (one frame): decode -> EXIF orientation -> RGB (alpha composited on white) -> bicubic resize in PIL to a
multiple of patch*merge (`smart_resize`) -> uint8 * rescale_factor (computed in float64, stored float32) ->
(x - mean) / std in float32 -> patches.

Patch layout: each row is one `patch_size` x `patch_size` patch flattened as (channel, time, row, col), i.e.
3 * temporal_patch_size * P * P values. Rows are ordered by temporal group, then by merge window (row-major over
the (H/P/merge, W/P/merge) grid), then row-major inside the merge x merge window, so every `merge**2` consecutive rows
form one LLM token. An image is a single temporal group whose frame is repeated `temporal_patch_size` times; a video
of frames f0, f1, f2, f3 is two groups (f0, f1) and (f2, f3), so the patches of a video of identical frame pairs
equal the concatenated image patches of those frames.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError

# PIL resampling filter ids as stored in preprocessor_config.json ("resample": 3 is bicubic).
PIL_BICUBIC = 3
DATA_URL_PREFIX = "data:"
BASE64_MARKER = ";base64"
ERROR_NAME_CHARS = 64  # how much of a long source (data URL, bytes) an error message quotes
ERROR_CAUSE_CHARS = 200  # how much of a decoder's own message an error quotes
# What Pillow raises for data it cannot decode: its plugins reject headers with SyntaxError, struct.error, IndexError,
# KeyError or TypeError, unsupported variants with OSError / NotImplementedError / ValueError, short data with
# EOFError / OSError, and absurd header fields surface as OverflowError or ZeroDivisionError.
PILLOW_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, NotImplementedError, struct.error, IndexError,
                        KeyError, TypeError, OverflowError, ZeroDivisionError)
RGB_CHANNELS = 3
WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class VisionProcessorConfig:
    """Image/video preprocessing numbers; defaults are the released Qwen3-Omni checkpoint's."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3_136  # 56 * 56
    max_pixels: int = 12_845_056  # 16384 * 28 * 28
    max_aspect_ratio: float = 200.0
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC
    # Refuse to decode images whose header claims more pixels than this (decompression bombs).
    max_decode_pixels: int = 8192 * 8192
    # Video: sampling rate and frame-count bounds of Qwen's helper, per-frame and whole-video pixel budgets.
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 100_352  # 128 * 28 * 28
    video_max_pixels: int = 602_112  # 768 * 28 * 28
    video_total_pixels: int = 90_316_800  # 128000 * 28 * 28 * 0.9
    video_min_pixels_headroom: float = 1.05  # per-frame floor = video_min_pixels * this

    @property
    def factor(self) -> int:
        """Side multiple of every resized frame: one LLM token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str | Path) -> "VisionProcessorConfig":
        """Read `preprocessor_config.json` / `video_preprocessor_config.json` from a checkpoint directory."""
        root = Path(path)
        fields: dict[str, Any] = {}
        image_json = _read_json(root / "preprocessor_config.json")
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample"):
            if key in image_json:
                fields[key] = image_json[key]
        for key in ("image_mean", "image_std"):
            if key in image_json:
                fields[key] = tuple(float(v) for v in image_json[key])
        fields.update(_pixel_bounds(image_json, "min_pixels", "max_pixels"))
        video_json = _read_json(root / "video_preprocessor_config.json")
        for src, dst in (("fps", "video_fps"), ("min_frames", "video_min_frames"), ("max_frames", "video_max_frames")):
            if video_json.get(src) is not None:
                fields[dst] = video_json[src]
        fields.update(_pixel_bounds(video_json, "video_min_pixels", "video_max_pixels"))
        return cls(**fields)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _pixel_bounds(blob: dict, min_key: str, max_key: str) -> dict[str, int]:
    """min/max pixels from `min_pixels`/`max_pixels`, else from `size.shortest_edge`/`size.longest_edge`."""
    size = blob.get("size") or {}
    out = {}
    low = blob.get("min_pixels", size.get("shortest_edge"))
    high = blob.get("max_pixels", size.get("longest_edge"))
    if low is not None:
        out[min_key] = int(low)
    if high is not None:
        out[max_key] = int(high)
    return out


class VisionInputError(MediaError):
    """An image or video input cannot be used; the message names the input."""


# ----------------------------------------------------------------------------------------------------------- loading


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith(DATA_URL_PREFIX):
        head = source[:ERROR_NAME_CHARS]
        return f"data URL {head!r}{'...' if len(source) > ERROR_NAME_CHARS else ''}"
    return repr(str(source))


def _decode_data_url(url: str, mime: str = "image/") -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(BASE64_MARKER) or not header[len(DATA_URL_PREFIX):].startswith(mime):
        kind = f"{mime.rstrip('/')} " if mime else ""
        raise VisionInputError(f"{_describe(url)}: not a base64 {kind}data URL (data:{mime or 'type/'}...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise VisionInputError(f"{_describe(url)}: invalid base64 payload ({exc})") from exc


def _cause(error: BaseException) -> str:
    """A decoder's exception as a short clause for an error message."""
    return f"{type(error).__name__}: {str(error)[:ERROR_CAUSE_CHARS]}"


def _source_bytes(source: str | Path | bytes | bytearray, what: str = "image") -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, str) and source.startswith(DATA_URL_PREFIX):
        return _decode_data_url(source)
    if isinstance(source, str) and "://" in source:
        raise VisionInputError(f"{_describe(source)}: URLs are not fetched; pass a local path, bytes or data URL")
    try:
        return Path(source).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise VisionInputError(f"{_describe(source)}: no such {what} file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name; OSError: too long, no permission
        raise VisionInputError(f"{_describe(source)}: cannot read the {what} file ({_cause(exc)})") from None


def _check_pixels(width: int, height: int, name: str, cfg: VisionProcessorConfig) -> None:
    if width * height > cfg.max_decode_pixels:
        raise VisionInputError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {cfg.max_decode_pixels} "
            "(possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise VisionInputError(f"{name}: empty image ({width}x{height})")


def _decode(data: bytes, name: str, cfg: VisionProcessorConfig) -> Image.Image:
    if not data:
        raise VisionInputError(f"{name}: empty input")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise VisionInputError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise VisionInputError(f"{name}: unsupported or corrupt image format") from None
    except PILLOW_DECODE_ERRORS as exc:
        raise VisionInputError(f"{name}: unsupported or corrupt image ({_cause(exc)})") from None
    _check_pixels(image.width, image.height, name, cfg)
    try:
        image.load()  # some formats (ICNS, ICO) settle on their real size only here, after Pillow's own bomb check
    except Image.DecompressionBombError as exc:
        raise VisionInputError(f"{name}: refused as a decompression bomb ({exc})") from None
    except PILLOW_DECODE_ERRORS as exc:
        raise VisionInputError(f"{name}: truncated or corrupt image data ({_cause(exc)})") from None
    _check_pixels(image.width, image.height, name, cfg)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparency (alpha band or palette/RGB transparency) is composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: Any, cfg: VisionProcessorConfig | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, a `data:image/...;base64,` URL or a PIL image.

    EXIF orientation is applied, transparency composited on white, and images whose header claims more than
    `cfg.max_decode_pixels` pixels are refused before any pixel data is decoded.
    """
    cfg = cfg or VisionProcessorConfig()
    if isinstance(source, Image.Image):
        name = f"<PIL image {source.mode} {source.width}x{source.height}>"
        _check_pixels(source.width, source.height, name, cfg)
        image = source
    elif isinstance(source, (str, Path, bytes, bytearray)):
        name = _describe(source)
        image = _decode(_source_bytes(source), name, cfg)
    else:
        raise VisionInputError(f"{type(source).__name__} input: expected a path, bytes, data URL or PIL image")
    try:
        return to_rgb(ImageOps.exif_transpose(image))  # a broken EXIF block or an unconvertible mode fails here
    except PILLOW_DECODE_ERRORS as exc:
        raise VisionInputError(f"{name}: cannot orient or convert the {image.mode} image to RGB "
                               f"({_cause(exc)})") from None


# ----------------------------------------------------------------------------------------------------------- resizing


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 max_aspect_ratio: float = VisionProcessorConfig.max_aspect_ratio) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Each side is first rounded to the nearest multiple; if the area is too large both sides are scaled down by
    sqrt(area / max_pixels) and floored to a multiple (never below one factor); if too small, scaled up by
    sqrt(min_pixels / area) and ceiled to a multiple.
    """
    if height < 1 or width < 1:
        raise VisionInputError(f"image of {width}x{height} pixels has no area")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise VisionInputError(f"image of {width}x{height} pixels: aspect ratio {ratio:.1f} exceeds {max_aspect_ratio}")
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def _normalised_frame(image: Image.Image, size: tuple[int, int], cfg: VisionProcessorConfig) -> torch.Tensor:
    """(3, H, W) float32: PIL resize to `size` (h, w), rescale (float64 product, float32 result), normalise."""
    height, width = size
    resized = image.resize((width, height), resample=cfg.resample)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
    scaled = (pixels.to(torch.float64) * cfg.rescale_factor).to(torch.float32)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(-1, 1, 1)
    return (scaled - mean) / std


def _patchify(frames: torch.Tensor, cfg: VisionProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, C, H, W) frames -> (grid_t*grid_h*grid_w, C*T*P*P) patches and (1, 3) grid; F padded with its last frame."""
    pad = -frames.shape[0] % cfg.temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    count, channels, height, width = frames.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    grid_t, grid_h, grid_w = count // t, height // p, width // p
    blocks = frames.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> (group, merge row, merge col, row in window, col in window, channel, time, patch row, patch col)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = blocks.reshape(grid_t * grid_h * grid_w, channels * t * p * p)
    grid = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
    return patches.contiguous(), grid


def image_patches(image: Any, cfg: VisionProcessorConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (anything `load_image` takes) -> (patches (N, 3*T*P*P) float32, grid_thw (1, 3) long)."""
    cfg = cfg or VisionProcessorConfig()
    rgb = load_image(image, cfg)
    size = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels, cfg.max_aspect_ratio)
    frame = _normalised_frame(rgb, size, cfg)
    return _patchify(frame.unsqueeze(0).expand(cfg.temporal_patch_size, -1, -1, -1), cfg)


# ------------------------------------------------------------------------------------------------------------- video


def video_frame_max_pixels(num_frames: int, cfg: VisionProcessorConfig) -> int:
    """Per-frame pixel cap: an even share of the whole-video budget per temporal group, within the frame bounds."""
    share = cfg.video_total_pixels * cfg.temporal_patch_size // max(num_frames, 1)
    floor = int(cfg.video_min_pixels * cfg.video_min_pixels_headroom)
    return max(min(cfg.video_max_pixels, share), floor)


def _frames_as_images(frames: Any) -> list[Image.Image]:
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        array = np.asarray(frames)
        if array.ndim != 4 or array.shape[-1] != RGB_CHANNELS or array.dtype != np.uint8:
            raise VisionInputError(
                f"video array of shape {array.shape} and dtype {array.dtype}: expected uint8 (T, H, W, 3)"
            )
        return [Image.fromarray(frame) for frame in array]
    images = list(frames)
    bad = [i for i, frame in enumerate(images) if not isinstance(frame, Image.Image)]
    if bad:
        raise VisionInputError(f"video frame {bad[0]} is a {type(images[bad[0]]).__name__}, expected a PIL image")
    return [to_rgb(frame) for frame in images]


def video_patches(frames: Sequence[Image.Image] | np.ndarray, fps_sampled: float,
                  cfg: VisionProcessorConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sampled frames -> (patches, grid_thw (1, 3), seconds_per_grid).

    All frames are resized to one common size (they must share their input size); the frame count is padded to a
    multiple of `temporal_patch_size` by repeating the last frame. `seconds_per_grid` is
    temporal_patch_size / fps_sampled with the fps the frames were really sampled at.
    """
    cfg = cfg or VisionProcessorConfig()
    if not fps_sampled > 0:
        raise VisionInputError(f"video sampled at {fps_sampled} fps: the rate must be positive")
    images = _frames_as_images(frames)
    if not images:
        raise VisionInputError("video with no frames")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise VisionInputError(f"video frames differ in size: {sorted(sizes)}")
    width, height = images[0].size
    for index, image in enumerate(images):
        _check_pixels(image.width, image.height, f"video frame {index}", cfg)
    max_pixels = video_frame_max_pixels(len(images), cfg)
    size = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, max_pixels, cfg.max_aspect_ratio)
    # One temporal group of frames at a time, straight into the output: a long video never holds its normalised
    # frames and their patch copy at once (2x the patches' size).
    t = cfg.temporal_patch_size
    images += [images[-1]] * (-len(images) % t)  # pad to whole groups with the last frame
    groups, per_group = len(images) // t, (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size)
    patches = torch.empty(groups * per_group, RGB_CHANNELS * t * cfg.patch_size ** 2)
    for g in range(groups):
        frames = torch.stack([_normalised_frame(image, size, cfg) for image in images[g * t:(g + 1) * t]])
        patches[g * per_group:(g + 1) * per_group] = _patchify(frames, cfg)[0]
    grid = torch.tensor([[groups, size[0] // cfg.patch_size, size[1] // cfg.patch_size]], dtype=torch.long)
    return patches, grid, t / fps_sampled


def sample_count(total_frames: int, native_fps: float, cfg: VisionProcessorConfig) -> int:
    """Frames to sample: duration * cfg.video_fps rounded to a temporal multiple, within the frame bounds."""
    t = cfg.temporal_patch_size
    wanted = round(total_frames / native_fps * cfg.video_fps / t) * t
    low = math.ceil(cfg.video_min_frames / t) * t
    # a clip shorter than one temporal group keeps all its frames (video_patches pads them)
    high = max(math.floor(min(cfg.video_max_frames, total_frames) / t) * t, min(total_frames, t))
    if high < 1:
        raise VisionInputError("video with no frames")
    return min(max(wanted, low), high)
