"""Whole prompts against the reference: token ids from `build_prompt` and TM-RoPE positions from `rope_positions`
equal those of transformers' `Qwen3OmniMoeProcessor` followed by the reference model's `get_rope_index`.

What is compared, per conversation shape:
  - thinktalk renders the messages itself (`build_prompt`); the reference is given the ChatML text written out by
    hand below (the layout in REFERENCE.md: one `<|audio_start|><|audio_pad|><|audio_end|>`,
    `<|vision_start|><|image_pad|><|vision_end|>` or `<|vision_start|><|video_pad|><|vision_end|>` per item) with
    the same media, and its own `__call__` expands the placeholders and tokenizes -> `input_ids`. The ids must be
    identical.
  - the reference's media metadata must equal thinktalk's: `image_grid_thw` (and `pixel_values` = our patches),
    `feature_attention_mask.sum(-1)` = our mel frame counts (and the valid `input_features` = our log-mel),
    `video_second_per_grid` = our seconds per temporal patch.
  - `rope_positions(ids, layout)` must equal `get_rope_index(input_ids, image_grid_thw, video_grid_thw,
    audio_seqlens = feature_attention_mask.sum(-1), second_per_grids = video_second_per_grid)` of the reference
    thinker, positions and rope delta.

How the reference processor is built (transformers 5.23.0, no torchvision here):
  - tokenizer: `AutoTokenizer` on a copy of the offline Qwen tokenizer files whose tokenizer_config.json gains the
    released checkpoint's `extra_special_tokens` (image/audio/video pads and the vision/audio start/end markers),
    which the processor reads as `tokenizer.image_token` etc.
  - image processor: `Qwen2VLImageProcessorPil` with the released numbers; feature extractor:
    `WhisperFeatureExtractor(feature_size=128)`.
  - video processor: the reference's only video processor (`Qwen2VLVideoProcessor`) needs torchvision. In its place
    goes `PrepatchedVideoProcessor`, a `VideoProcessorMixin` subclass (the base class the processor requires) that
    returns thinktalk's already-made patches and grids, as REFERENCE.md prescribes for reference video parity. So
    for videos, pixels and grids are thinktalk's by construction; everything after that is the reference's own
    code: `video_second_per_grid = temporal_patch_size / fps` from the fps we pass (the known sampled fps, 2.0),
    `replace_video_token` / `replace_video_with_audio_token` (the time interleaving of a video's audio), the
    text expansion and the tokenization.
  - `ReferenceProcessor` subclasses `Qwen3OmniMoeProcessor` only to let its constructor accept that video
    processor: the base constructor checks the video processor's class by looking `VideoProcessorMixin` up on the
    top-level `transformers` module, which does not export it without torchvision (the lookup then fails with
    "VIDEO_PROCESSOR_MAPPING has no attribute _extra_content"). Nothing else is overridden.
  - audio inside a video: the reference decodes a video's sound track only with torchcodec (absent), so it is
    passed the track's waveform (the very samples written into the file, PCM, so decoding is exact) as the
    processor's "one audio per slot" input with `audio_from_video_indices`; thinktalk decodes the file itself.

The Thinking-model shape checks that earlier assistant turns lose their `<think>...</think>` blocks: the reference
gets the hand-written ChatML without them.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from thinktalk.config import parse_config
from thinktalk.processing.audio import AudioFeatureConfig
from thinktalk.processing.multimodal import MediaOptions, build_prompt
from thinktalk.processing.positions import rope_positions
from thinktalk.processing.tokenizer import Tokenizer
from thinktalk.processing.vision import VisionProcessorConfig

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, BatchFeature, Qwen3OmniMoeProcessor, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.video_processing_utils import VideoProcessorMixin  # noqa: E402

RATE = 16000
VIDEO_FPS = 2.0  # the sampled rate of every video below (frames given at cfg.video_fps; the file is made so)
MULTIMODAL_TOKENS = {  # as in the released Qwen3-Omni tokenizer_config.json
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
AUD = "<|audio_start|><|audio_pad|><|audio_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


class PrepatchedVideoProcessor(VideoProcessorMixin):
    """Returns the pre-patched videos it was built with (the reference's pixel path needs torchvision)."""

    def __init__(self, patches: list[torch.Tensor], grids: list[tuple[int, int, int]], **kwargs):
        super().__init__(**kwargs)
        self.prepatched, self.grids = patches, grids

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        assert len(videos) == len(self.grids)
        return BatchFeature({"pixel_values_videos": torch.cat(self.prepatched) if self.prepatched else None,
                             "video_grid_thw": torch.tensor(self.grids)})


class ReferenceProcessor(Qwen3OmniMoeProcessor):
    """Qwen3OmniMoeProcessor whose constructor accepts a VideoProcessorMixin without torchvision (see above)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"expected a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


# ------------------------------------------------------------------------------------------------------- media


def tone(seconds: float, hz: float, seed: int) -> np.ndarray:
    n = int(round(seconds * RATE))
    t = np.arange(n) / RATE
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.4 * np.sin(2 * np.pi * hz * t) + 0.1 * np.sin(2 * np.pi * 2900 * t) + 0.02 * noise).astype(np.float32)


def picture(width: int, height: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def frames(count: int, width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def write_video_with_audio(path, wave: np.ndarray, seconds: int, native_fps: int = 10):
    """A clip of `seconds` s at `native_fps` (mpeg4) with a 16-bit PCM mono track -> (path, exact track samples)."""
    av = pytest.importorskip("av")
    pcm = np.round(wave * 32767).astype(np.int16)
    with av.open(str(path), mode="w") as container:
        picture_stream = container.add_stream("mpeg4", rate=native_fps)
        picture_stream.width, picture_stream.height, picture_stream.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("pcm_s16le", rate=RATE, layout="mono")
        for index in range(seconds * native_fps):
            image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (index * 7) % 256, np.uint8), format="rgb24")
            image.pts, image.time_base = index, Fraction(1, native_fps)
            for packet in picture_stream.encode(image):
                container.mux(packet)
        for packet in picture_stream.encode(None):
            container.mux(packet)
        for start in range(0, len(pcm), 1024):
            chunk = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = RATE, start, Fraction(1, RATE)
            for packet in sound.encode(chunk):
                container.mux(packet)
        for packet in sound.encode(None):
            container.mux(packet)
    return path, pcm.astype(np.float32) / 32768.0


# ------------------------------------------------------------------------------------------------------- shapes


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


def shapes(video_file, video_track):
    """name -> (messages, hand-written ChatML, images, audios, videos for the reference, audio_from_video_indices)."""
    a1, a2, a3 = tone(2.5, 440, 1), tone(1.0, 660, 2), tone(7.77, 300, 3)
    long_audio = tone(45.67, 520, 4)
    i1, i2, i3 = picture(64, 64, 5), picture(200, 120, 6), picture(96, 250, 7)
    v1, v2 = frames(4, 96, 64, 8), frames(6, 64, 64, 9)
    gen = "<|im_start|>assistant\n"
    return {
        "text only": (
            [{"role": "user", "content": "Hello, world! How are you?"}],
            "<|im_start|>user\nHello, world! How are you?<|im_end|>\n" + gen, [], [], [], None),
        "one audio": (
            [user({"type": "audio", "audio": (a1, RATE)}, text("What is said?"))],
            f"<|im_start|>user\n{AUD}What is said?<|im_end|>\n" + gen, [], [a1], [], None),
        "two audios": (
            [user(text("Compare "), {"type": "audio", "audio": (a2, RATE)}, text(" and "),
                  {"type": "audio", "audio": (a3, RATE)})],
            f"<|im_start|>user\nCompare {AUD} and {AUD}<|im_end|>\n" + gen, [], [a2, a3], [], None),
        "one image": (
            [user({"type": "image", "image": i2}, text("Describe it."))],
            f"<|im_start|>user\n{IMG}Describe it.<|im_end|>\n" + gen, [i2], [], [], None),
        "images of different sizes": (
            [user({"type": "image", "image": i1}, text("then"), {"type": "image", "image": i2},
                  {"type": "image", "image": i3}, text("Which differ?"))],
            f"<|im_start|>user\n{IMG}then{IMG}{IMG}Which differ?<|im_end|>\n" + gen, [i1, i2, i3], [], [], None),
        "a video": (
            [user({"type": "video", "video": v1}, text("What happens?"))],
            f"<|im_start|>user\n{VID}What happens?<|im_end|>\n" + gen, [], [], [v1], None),
        "a video with use_audio_in_video": (
            [user(text("Watch: "), {"type": "video", "video": str(video_file)}, text(" Summarize."))],
            f"<|im_start|>user\nWatch: {VID} Summarize.<|im_end|>\n" + gen, [], [video_track], [str(video_file)],
            [0]),
        "audio + image + video + text in one turn": (
            [user(text("Listen "), {"type": "audio", "audio": (a2, RATE)}, text(", look "),
                  {"type": "image", "image": i3}, text(" and watch "), {"type": "video", "video": v2},
                  text(". Relate them."))],
            f"<|im_start|>user\nListen {AUD}, look {IMG} and watch {VID}. Relate them.<|im_end|>\n" + gen,
            [i3], [a2], [v2], None),
        "a system prompt": (
            [{"role": "system", "content": "You are a helpful voice assistant."},
             user({"type": "audio", "audio": (a1, RATE)}, text("Answer briefly."))],
            "<|im_start|>system\nYou are a helpful voice assistant.<|im_end|>\n"
            f"<|im_start|>user\n{AUD}Answer briefly.<|im_end|>\n" + gen, [], [a1], [], None),
        "three turns with earlier assistant replies": (
            [user({"type": "image", "image": i1}, text("What colour?")),
             {"role": "assistant", "content": "Mostly noise, many colours."},
             user(text("And this?"), {"type": "audio", "audio": (a2, RATE)}),
             {"role": "assistant", "content": [text("A tone at 660 Hz.")]},
             {"role": "user", "content": "Thanks! 谢谢"}],
            f"<|im_start|>user\n{IMG}What colour?<|im_end|>\n"
            "<|im_start|>assistant\nMostly noise, many colours.<|im_end|>\n"
            f"<|im_start|>user\nAnd this?{AUD}<|im_end|>\n"
            "<|im_start|>assistant\nA tone at 660 Hz.<|im_end|>\n"
            "<|im_start|>user\nThanks! 谢谢<|im_end|>\n" + gen, [i1], [a2], [], None),
        "long audio (more than 30 s)": (
            [user({"type": "audio", "audio": (long_audio, RATE)}, text("Transcribe."))],
            f"<|im_start|>user\n{AUD}Transcribe.<|im_end|>\n" + gen, [], [long_audio], [], None),
        "Thinking-model prompt": (
            [user(text("What is 2+2?")),
             {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
             user({"type": "audio", "audio": (a2, RATE)}, text("And this one?")),
             {"role": "assistant", "content": [text("<think>A pure tone.</think>It is a tone.")]},
             user(text("Why?"))],
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
            f"<|im_start|>user\n{AUD}And this one?<|im_end|>\n"
            "<|im_start|>assistant\nIt is a tone.<|im_end|>\n"
            "<|im_start|>user\nWhy?<|im_end|>\n" + gen, [], [a2], [], None),
    }


SHAPE_NAMES = ["text only", "one audio", "two audios", "one image", "images of different sizes", "a video",
               "a video with use_audio_in_video", "audio + image + video + text in one turn", "a system prompt",
               "three turns with earlier assistant replies", "long audio (more than 30 s)", "Thinking-model prompt"]


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tiny, qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_parity")
    tokenizer_dir = root / "tokenizer"
    shutil.copytree(qwen_dir, tokenizer_dir)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = MULTIMODAL_TOKENS
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    video_file, track = write_video_with_audio(root / "clip.mkv", tone(4.0, 350, 10), seconds=4)
    return {
        "cfg": parse_config(tiny.config).thinker,
        "ours": Tokenizer.from_dir(qwen_dir),
        "theirs": AutoTokenizer.from_pretrained(tokenizer_dir),
        "reference": tiny.reference,
        "shapes": shapes(video_file, track),
    }


def reference_processor(tokenizer, vision: VisionProcessorConfig, video_patches, video_grids):
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size, merge_size=vision.merge_size,
        min_pixels=vision.min_pixels, max_pixels=vision.max_pixels, image_mean=list(vision.image_mean),
        image_std=list(vision.image_std))
    video_processor = PrepatchedVideoProcessor(video_patches, video_grids, patch_size=vision.patch_size,
                                               temporal_patch_size=vision.temporal_patch_size,
                                               merge_size=vision.merge_size)
    return ReferenceProcessor(image_processor=image_processor, video_processor=video_processor,
                              feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)


# -------------------------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_prompt_matches_reference_processor_and_rope_index(name, setup):
    cfg, vision = setup["cfg"], VisionProcessorConfig()
    messages, chatml, images, audios, videos, audio_from_video = setup["shapes"][name]
    use_audio_in_video = audio_from_video is not None
    ours = build_prompt(messages, setup["ours"], cfg, MediaOptions(AudioFeatureConfig(), vision), use_audio_in_video)

    processor = reference_processor(setup["theirs"], vision, [v.patches for v in ours.videos],
                                    [v.grid_thw for v in ours.videos])
    kwargs = {"n_window": cfg.audio.n_window, "position_id_per_seconds": cfg.position_id_per_seconds,
              "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if audios:
        kwargs["audio"], kwargs["audio_kwargs"] = audios, {"sampling_rate": RATE}
    if videos:
        kwargs["videos"], kwargs["videos_kwargs"] = videos, {"fps": VIDEO_FPS}
    if use_audio_in_video:
        kwargs["load_audio_from_video"], kwargs["audio_from_video_indices"] = True, audio_from_video
    theirs = processor(text=[chatml], **kwargs)

    # token ids
    assert ours.token_ids == theirs["input_ids"][0].tolist()

    # media metadata
    assert len(ours.images) == len(images) and len(ours.videos) == len(videos) and len(ours.audios) == len(audios)
    if images:
        assert [list(i.grid_thw) for i in ours.images] == theirs["image_grid_thw"].tolist()
        torch.testing.assert_close(torch.cat([i.patches for i in ours.images]), theirs["pixel_values"].float(),
                                   atol=1e-5, rtol=0)
    frames = None
    if audios:
        frames = theirs["feature_attention_mask"].sum(-1)
        assert [a.features.shape[1] for a in ours.audios] == frames.tolist()
        for index, item in enumerate(ours.audios):
            # The reference pads a batch of clips to the longest before its centred STFT, so a shorter clip's last
            # frame sees padding zeros instead of the reflected end it gets alone (as thinktalk prepares it).
            valid = int(frames[index]) - (int(frames[index]) < theirs["input_features"].shape[-1])
            reference_mel = theirs["input_features"][index][:, :valid]
            assert (item.features[:, :valid] - reference_mel.float()).abs().max() < 1e-4
    if videos:
        assert [v.seconds_per_grid for v in ours.videos] == pytest.approx(theirs["video_second_per_grid"])
        assert theirs["video_grid_thw"].tolist() == [list(v.grid_thw) for v in ours.videos]

    if use_audio_in_video:  # the shape really interleaves: audio tokens sit between the video's frames
        ids, video = ours.token_ids, ours.videos[0]
        assert video.grid_thw[0] >= 3 and video.audio is not None
        first_audio = ids.index(cfg.audio_token_id)
        assert ids.index(cfg.video_token_id) < first_audio < len(ids) - 1 - ids[::-1].index(cfg.video_token_id)

    # positions
    positions, delta = rope_positions(ours.token_ids, ours.layout, cfg, use_audio_in_video)
    with torch.no_grad():
        their_positions, their_delta = setup["reference"].thinker.model.get_rope_index(
            theirs["input_ids"],
            image_grid_thw=theirs.get("image_grid_thw"),
            video_grid_thw=theirs.get("video_grid_thw"),
            attention_mask=theirs["attention_mask"],
            use_audio_in_video=use_audio_in_video,
            audio_seqlens=frames,
            second_per_grids=torch.as_tensor(theirs["video_second_per_grid"]) if videos else None,
        )
    torch.testing.assert_close(positions, their_positions[:, 0].float(), atol=1e-5, rtol=0)
    assert delta == pytest.approx(float(their_delta.reshape(-1)[0]), abs=1e-5)
