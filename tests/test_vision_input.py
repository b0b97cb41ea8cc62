"""Image/video input parity with the reference image processor (transformers' Qwen2VLImageProcessorPil, the PIL
backend Qwen3-Omni's processor uses when torchvision is absent), plus input decoding and error handling.

Video layout: the reference video processor needs torchvision, so video patches are checked structurally against
the reference image path: an image is one temporal group holding its frame twice, and a video's temporal group g
holds frames (2g, 2g+1) in the same (channel, time, row, col) patch layout and the same merge-window row order, so
a video of frames a, a, b, b is exactly image(a) followed by image(b) when both use the same target size.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from thinktalk.processing.vision import (
    VisionInputError,
    VisionProcessorConfig,
    image_patches,
    load_image,
    sample_count,
    smart_resize,
    video_frame_max_pixels,
    video_patches,
)
from thinktalk.processing.video import load_video

qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SMALL_MAX = 200_000  # a lowered max_pixels so "above max_pixels" cases stay cheap


def reference(cfg: VisionProcessorConfig):
    return qwen2_vl_pil.Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std), resample=cfg.resample,
    )


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def assert_matches_reference(image: Image.Image, cfg: VisionProcessorConfig) -> None:
    out = reference(cfg)(images=image, return_tensors="pt")
    patches, grid = image_patches(image, cfg)
    assert grid.dtype == torch.long and grid.tolist() == out["image_grid_thw"].tolist()
    assert patches.dtype == torch.float32 and patches.shape == out["pixel_values"].shape
    assert torch.equal(patches, out["pixel_values"])


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- parity: pixels


@pytest.mark.parametrize("width,height,max_pixels", [
    (3, 2, None),            # tiny, far below min_pixels
    (17, 9, None),           # below min_pixels
    (56, 56, None),          # exactly min_pixels
    (640, 480, None),        # ordinary 4:3
    (500, 333, None),        # sides not multiples of 32
    (33, 1000, None),        # tall, 1:30
    (6000, 31, None),        # very wide, ~1:194 (the limit is 200)
    (1200, 900, SMALL_MAX),  # above max_pixels: downscaled
    (3000, 40, SMALL_MAX),   # elongated and above max_pixels
])
def test_image_patches_equal_reference(width, height, max_pixels):
    cfg = VisionProcessorConfig() if max_pixels is None else VisionProcessorConfig(max_pixels=max_pixels)
    assert_matches_reference(random_image(width, height, seed=width * height), cfg)


def test_smart_resize_equals_reference_over_many_sizes():
    rng = np.random.default_rng(1)
    cfg = VisionProcessorConfig()
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 20_000, (300, 2)) if max(h, w) / min(h, w) <= 200]
    sizes += [(1, 1), (32, 32), (4000, 3500), (16384, 16384), (28, 5000)]
    for h, w in sizes:
        expected = qwen2_vl_pil.smart_resize(h, w, factor=cfg.factor, min_pixels=cfg.min_pixels,
                                              max_pixels=cfg.max_pixels)
        got = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        assert got == expected, (h, w)
        assert got[0] % 32 == 0 and got[1] % 32 == 0


def test_token_layout_grid_and_shape():
    patches, grid = image_patches(random_image(640, 480))
    assert grid.tolist() == [[1, 30, 40]]
    assert patches.shape == (30 * 40, 3 * 2 * 16 * 16)
    # one merge window = 4 consecutive rows = top-left 32x32 pixels; first patch row 0, channel 0, time 0
    img = np.asarray(random_image(640, 480), dtype=np.float32) / 255 * 2 - 1
    assert torch.allclose(patches[0, :16], torch.from_numpy(img[0, :16, 0]), atol=1e-6)
    assert torch.allclose(patches[1, :16], torch.from_numpy(img[0, 16:32, 0]), atol=1e-6)
    assert torch.allclose(patches[2, :16], torch.from_numpy(img[16, :16, 0]), atol=1e-6)


def test_aspect_ratio_over_200_is_refused():
    with pytest.raises(VisionInputError, match="aspect ratio"):
        image_patches(random_image(2010, 10))


# ------------------------------------------------------------------------------------------------- modes and EXIF


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "P-transparent", "RGB-transparent"])
def test_modes_equal_reference(mode):
    rng = np.random.default_rng(2)
    base = Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P-transparent":
        image = base.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    elif mode == "RGB-transparent":
        image = base.convert("RGB")
        image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[0, 0])
    else:
        image = base.convert(mode)
    assert_matches_reference(image, VisionProcessorConfig())
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    image.putpixel((0, 0), (10, 20, 30, 255))
    pixels = np.asarray(load_image(image))
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[7, 7].tolist() == [255, 255, 255]


def test_exif_rotated_jpeg(tmp_path):
    raw = np.zeros((40, 64, 3), dtype=np.uint8)
    raw[:, :32] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode(Image.fromarray(raw), "JPEG", exif=exif, quality=95))
    image = load_image(path)
    assert image.size == (40, 64)  # (width, height) swapped
    pixels = np.asarray(image).astype(int)
    assert pixels[2, 20, 0] > 200 and pixels[2, 20, 1] < 60   # red now on top
    assert pixels[60, 20, 0] < 60                              # black at the bottom
    decoded = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(pixels, np.rot90(decoded, k=-1))
    assert_matches_reference(image, VisionProcessorConfig())


def test_sources_agree(tmp_path):
    image = random_image(100, 60)
    png = encode(image, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    expected = np.asarray(image)
    for source in (image, png, bytearray(png), path, str(path), url):
        assert np.array_equal(np.asarray(load_image(source)), expected)


# ------------------------------------------------------------------------------------------------- bad inputs


def png_header(width: int, height: int) -> bytes:
    """A valid PNG claiming width x height whose pixel data holds 16 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(VisionInputError, match="nope.png"):
        load_image(missing)


def test_error_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(VisionInputError, match="empty"):
        load_image(path)
    with pytest.raises(VisionInputError, match="0 bytes"):
        load_image(b"")


def test_error_truncated_file(tmp_path):
    png = encode(random_image(64, 64), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(png[: len(png) // 2])
    with pytest.raises(VisionInputError, match="cut.png.*truncated"):
        load_image(path)


def test_error_corrupt_and_unsupported(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all")
    with pytest.raises(VisionInputError, match="notes.txt.*unsupported"):
        load_image(path)
    with pytest.raises(VisionInputError, match="bytes.*unsupported"):
        load_image(bytes(range(256)))
    with pytest.raises(VisionInputError, match="int input"):
        load_image(42)
    with pytest.raises(VisionInputError, match="http://example.com/a.png"):
        load_image("http://example.com/a.png")


@pytest.mark.parametrize("url,match", [
    ("data:text/plain;base64,aGVsbG8=", "not a base64 image data URL"),
    ("data:image/png,rawdata", "not a base64 image data URL"),
    ("data:image/png;base64", "not a base64 image data URL"),
    ("data:image/png;base64,@@@not-base64@@@", "invalid base64"),
    ("data:image/png;base64,aGVsbG8=", "unsupported"),
])
def test_error_bad_data_url(url, match):
    with pytest.raises(VisionInputError, match=match) as info:
        load_image(url)
    assert "data URL 'data:" in str(info.value)


def test_error_decompression_bomb_refused_before_decoding(tmp_path):
    # 9000 x 9000 exceeds our 64 Mpx limit but not PIL's own; the file holds no pixel data, so reaching the
    # decoder would report truncation instead of the size.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(9000, 9000))
    with pytest.raises(VisionInputError, match="bomb.png.*9000x9000.*decompression bomb"):
        load_image(path)
    with pytest.raises(VisionInputError, match="decompression bomb"):
        load_image(png_header(100_000, 100_000))
    with pytest.raises(VisionInputError, match="decompression bomb"):
        load_image(random_image(40, 30), VisionProcessorConfig(max_decode_pixels=1000))


# ------------------------------------------------------------------------------------------------- video


def video_cfg() -> VisionProcessorConfig:
    """Video bounds equal to the image bounds, so frames get the image path's target size."""
    base = VisionProcessorConfig()
    return VisionProcessorConfig(video_min_pixels=base.min_pixels, video_max_pixels=base.max_pixels,
                                 video_total_pixels=10 ** 12)


def test_video_patches_equal_image_patches_per_frame_pair():
    cfg = video_cfg()
    a, b = random_image(96, 64, seed=1), random_image(96, 64, seed=2)
    patches, grid, seconds = video_patches([a, a, b, b], 2.0, cfg)
    pa, ga = image_patches(a, cfg)
    pb, _ = image_patches(b, cfg)
    assert grid.tolist() == [[2, ga[0, 1].item(), ga[0, 2].item()]]
    assert torch.equal(patches, torch.cat([pa, pb]))
    assert seconds == 1.0


def test_video_odd_frame_count_pads_with_last_frame_and_array_input():
    cfg = video_cfg()
    frames = [random_image(80, 48, seed=s) for s in range(3)]
    patches, grid, seconds = video_patches(frames, 4.0, cfg)
    assert grid[0, 0].item() == 2 and seconds == 0.5
    per_group = patches.shape[0] // 2
    assert torch.equal(patches[per_group:], image_patches(frames[2], cfg)[0])
    # a (T, H, W, 3) uint8 array gives the same result as the list of PIL frames
    array = np.stack([np.asarray(f) for f in frames])
    assert torch.equal(video_patches(array, 4.0, cfg)[0], patches)
    # temporal pairs: time index 0 of the first group is frame 0, time index 1 is frame 1
    first = patches[:per_group].view(per_group, 3, 2, 16, 16)
    pa, pb = image_patches(frames[0], cfg)[0], image_patches(frames[1], cfg)[0]
    assert torch.equal(first[:, :, 0], pa.view(per_group, 3, 2, 16, 16)[:, :, 0])
    assert torch.equal(first[:, :, 1], pb.view(per_group, 3, 2, 16, 16)[:, :, 1])


def test_video_default_budgets():
    cfg = VisionProcessorConfig()
    assert video_frame_max_pixels(4, cfg) == cfg.video_max_pixels
    many = video_frame_max_pixels(768, cfg)
    assert many == max(min(cfg.video_max_pixels, cfg.video_total_pixels * 2 // 768),
                       int(cfg.video_min_pixels * 1.05))
    frames = np.zeros((4, 720, 1280, 3), dtype=np.uint8)
    _, grid, _ = video_patches(frames, 2.0, cfg)
    h, w = smart_resize(720, 1280, 32, cfg.video_min_pixels, cfg.video_max_pixels)
    assert grid.tolist() == [[2, h // 16, w // 16]] and h * w <= cfg.video_max_pixels


def test_video_errors():
    with pytest.raises(VisionInputError, match="differ in size"):
        video_patches([random_image(32, 32), random_image(64, 32)], 2.0)
    with pytest.raises(VisionInputError, match="uint8"):
        video_patches(np.zeros((2, 8, 8, 3), dtype=np.float32), 2.0)
    with pytest.raises(VisionInputError, match="fps"):
        video_patches([random_image(32, 32)] * 2, 0.0)
    with pytest.raises(VisionInputError, match="frame 1"):
        video_patches([random_image(32, 32), "x"], 2.0)


def write_video(path, seconds: float, fps: int, width: int = 64, height: int = 48) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((height, width, 3), (i * 5) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_load_video_samples_at_cfg_fps(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, seconds=4, fps=10)
    frames, fps = load_video(path)
    assert len(frames) == 8 and math.isclose(fps, 2.0)
    assert frames[0].size == (64, 48) and frames[0].mode == "RGB"
    _, grid, seconds = video_patches(frames, fps)
    assert grid[0, 0].item() == 4 and math.isclose(seconds, 1.0)
    short = tmp_path / "short.mp4"
    write_video(short, seconds=1, fps=10)
    frames, fps = load_video(short)
    assert len(frames) == 4 and math.isclose(fps, 4.0)  # min_frames wins: the real rate is 4 fps, not 2


def test_load_video_errors(tmp_path):
    with pytest.raises(VisionInputError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(VisionInputError, match="bad.mp4"):
        load_video(bad)


def test_config_from_dir(tmp_path):
    assert VisionProcessorConfig.from_dir(tmp_path) == VisionProcessorConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 14, "min_pixels": 100, "max_pixels": 1000, "image_mean": [0.1, 0.2, 0.3],
        "feature_size": 128,
    }))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({
        "fps": 1.0, "min_frames": 2, "size": {"shortest_edge": 50, "longest_edge": 5000},
    }))
    cfg = VisionProcessorConfig.from_dir(tmp_path)
    assert (cfg.patch_size, cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (14, 100, 1000, (0.1, 0.2, 0.3))
    assert (cfg.video_fps, cfg.video_min_frames, cfg.video_min_pixels, cfg.video_max_pixels) == (1.0, 2, 50, 5000)
    assert cfg.video_max_frames == 768 and cfg.temporal_patch_size == 2


def test_sample_count_bounds():
    cfg = VisionProcessorConfig()
    assert sample_count(40, 10.0, cfg) == 8            # 4 s at 2 fps
    assert sample_count(10, 10.0, cfg) == 4            # 1 s: raised to min_frames
    assert sample_count(3, 30.0, cfg) == 2             # fewer frames than min_frames: whole temporal groups
    assert sample_count(1, 30.0, cfg) == 1             # a single frame is kept (padded later)
    assert sample_count(100_000, 25.0, cfg) == 768     # capped at max_frames
    assert sample_count(41, 10.0, cfg) % 2 == 0
    with pytest.raises(VisionInputError, match="no frames"):
        sample_count(0, 10.0, cfg)
