"""Qwen2.5-Omni's thinker and its encoders against the reference (transformers `qwen2_5_omni`) on a tiny random
checkpoint saved with `save_pretrained` and loaded strictly: logits within 1e-4 (float32) for text, image, audio,
video and video-with-its-audio prompts, the encoders alone, TM-RoPE positions, and the input preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from checkpoints_qwen2_5 import load_thinktalk, tiny_checkpoint

from thinktalk.config_qwen2_5 import audio_token_count
from thinktalk.models.qwen2_5.thinker import MediaEmbeds
from thinktalk.processing.qwen2_5_inputs import QWEN2_5_VISION, qwen2_5_audio_features
from thinktalk.processing.qwen2_5_positions import (MediaLayout, PositionError, VideoGrid, qwen2_5_rope_positions,
                                                   video_with_audio_tokens)
from thinktalk.processing.vision import image_patches

ATOL = 1e-4
PATCH_NUMEL = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_thinktalk(ckpt.path, audio_output=False)


@dataclass
class Prompt:
    """A prompt with media, for both implementations: ids, thinktalk's media metadata, the reference's kwargs."""

    ids: list[int] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)  # (128, frames) each
    images: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)
    videos: list[tuple[torch.Tensor, VideoGrid]] = field(default_factory=list)
    seed: int = 0

    def text(self, count: int) -> "Prompt":
        gen = torch.Generator().manual_seed(self.seed + len(self.ids))
        self.ids += torch.randint(0, 150000, (count,), generator=gen).tolist()
        return self

    def add_audio(self, frames: int, layout) -> "Prompt":
        self.audio.append(torch.randn(128, frames, generator=torch.Generator().manual_seed(frames)))
        self.ids += [layout.audio_start_token_id] + [layout.audio_token_id] * audio_token_count(frames) + \
                    [layout.audio_end_token_id]
        return self

    def add_image(self, grid: tuple[int, int, int], layout) -> "Prompt":
        self.images.append((self._patches(grid), grid))
        self.ids += [layout.vision_start_token_id] + [layout.image_token_id] * (grid[0] * grid[1] * grid[2] // 4) + \
                    [layout.vision_end_token_id]
        return self

    def add_video(self, grid: tuple[int, int, int], seconds: float, layout, audio_frames: int | None = None):
        video = VideoGrid(grid, seconds)
        self.videos.append((self._patches(grid), video))
        if audio_frames is None:
            self.ids += [layout.vision_start_token_id] + [layout.video_token_id] * (math_prod(grid) // 4) + \
                        [layout.vision_end_token_id]
            return self
        self.audio.append(torch.randn(128, audio_frames, generator=torch.Generator().manual_seed(audio_frames)))
        inner = video_with_audio_tokens(video, audio_token_count(audio_frames), layout)
        self.ids += [layout.vision_start_token_id, layout.audio_start_token_id] + inner + \
                    [layout.audio_end_token_id, layout.vision_end_token_id]
        return self

    def _patches(self, grid) -> torch.Tensor:
        return torch.randn(math_prod(grid), PATCH_NUMEL, generator=torch.Generator().manual_seed(math_prod(grid)))

    def layout(self) -> MediaLayout:
        return MediaLayout(audio_token_counts=tuple(audio_token_count(a.shape[1]) for a in self.audio),
                           image_grids=tuple(g for _, g in self.images), videos=tuple(v for _, v in self.videos))

    def reference_kwargs(self, use_audio_in_video: bool) -> dict:
        ids = torch.tensor([self.ids])
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_audio_in_video=use_audio_in_video)
        if self.audio:
            longest = max(a.shape[1] for a in self.audio)
            kwargs["input_features"] = torch.stack([torch.nn.functional.pad(a, (0, longest - a.shape[1]))
                                                    for a in self.audio])
            kwargs["feature_attention_mask"] = torch.stack([torch.arange(longest) < a.shape[1] for a in self.audio]).long()
        if self.images:
            kwargs["pixel_values"] = torch.cat([p for p, _ in self.images])
            kwargs["image_grid_thw"] = torch.tensor([g for _, g in self.images])
        if self.videos:
            kwargs["pixel_values_videos"] = torch.cat([p for p, _ in self.videos])
            kwargs["video_grid_thw"] = torch.tensor([v.grid_thw for _, v in self.videos])
            kwargs["video_second_per_grid"] = torch.tensor([v.seconds_per_grid for _, v in self.videos])
        return kwargs


def math_prod(grid) -> int:
    return grid[0] * grid[1] * grid[2]


def thinktalk_logits(model, prompt: Prompt, use_audio_in_video: bool) -> torch.Tensor:
    thinker = model.thinker
    with torch.no_grad():
        media = MediaEmbeds(
            audio=torch.cat(thinker.audio_tower(prompt.audio)) if prompt.audio else None,
            image=thinker.visual(torch.cat([p for p, _ in prompt.images]),
                                 torch.tensor([g for _, g in prompt.images])) if prompt.images else None,
            video=thinker.visual(torch.cat([p for p, _ in prompt.videos]),
                                 torch.tensor([v.grid_thw for _, v in prompt.videos])) if prompt.videos else None)
        ids = torch.tensor([prompt.ids])
        positions, _ = qwen2_5_rope_positions(prompt.ids, prompt.layout(), thinker.cfg.layout, use_audio_in_video)
        return thinker(thinker.embed_prompt(ids, media), positions.unsqueeze(1)).logits[0]


def reference_logits(reference, prompt: Prompt, use_audio_in_video: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return reference.thinker(**prompt.reference_kwargs(use_audio_in_video)).logits[0]


def prompts(layout) -> dict[str, tuple[Prompt, bool]]:
    return {
        "text": (Prompt(seed=1).text(33), False),
        "image": (Prompt(seed=2).text(5).add_image((1, 12, 20), layout).text(4), False),
        "two audios": (Prompt(seed=3).text(3).add_audio(450, layout).text(2).add_audio(37, layout).text(3), False),
        "video": (Prompt(seed=4).text(4).add_video((3, 8, 12), 1.0, layout).text(3), False),
        "video with its audio": (Prompt(seed=5).text(4).add_video((6, 4, 4), 1.0, layout, audio_frames=600).text(3),
                                 True),
        "image, audio and video": (Prompt(seed=6).add_image((1, 4, 8), layout).text(2).add_audio(230, layout)
                                   .add_video((2, 4, 4), 2.0, layout).text(2), False),
    }


@pytest.mark.parametrize("name", ["text", "image", "two audios", "video", "video with its audio",
                                  "image, audio and video"])
def test_logits_match_the_reference(ckpt, ours, name):
    prompt, use_audio_in_video = prompts(ours.cfg.thinker.layout)[name]
    theirs = reference_logits(ckpt.reference, prompt, use_audio_in_video)
    assert theirs.std() > 1.0, "weights too weak for a meaningful comparison"
    torch.testing.assert_close(thinktalk_logits(ours, prompt, use_audio_in_video), theirs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("grid, seconds, audio_frames", [
    ((6, 4, 4), 1.0, 600),  # 2 fps: chunks of two temporal patches, audio 6 s
    ((5, 4, 6), 0.75, 170),  # fractional ids (18.75 per grid, truncated); the audio shorter than the video
    ((3, 4, 4), 4.0, 1000),  # ids jump by 100 > one 50-id chunk: the reference's one-token chunks
])
def test_video_with_audio_positions_match_the_reference(ckpt, ours, grid, seconds, audio_frames):
    layout = ours.cfg.thinker.layout
    prompt = Prompt(seed=7).text(3).add_video(grid, seconds, layout, audio_frames=audio_frames).text(2)
    prompt.add_image((1, 4, 4), layout).text(1)
    kwargs = prompt.reference_kwargs(True)
    with torch.no_grad():
        expected, delta = ckpt.reference.thinker.get_rope_index(
            kwargs["input_ids"], kwargs["image_grid_thw"], kwargs["video_grid_thw"], kwargs["attention_mask"], True,
            kwargs["feature_attention_mask"].sum(-1), kwargs["video_second_per_grid"])
    got, our_delta = qwen2_5_rope_positions(prompt.ids, prompt.layout(), layout, use_audio_in_video=True)
    assert torch.equal(got, expected[:, 0]) and our_delta == int(delta)


def test_placeholder_mismatches_are_errors(ours):
    layout = ours.cfg.thinker.layout
    prompt = Prompt(seed=8).text(2).add_image((1, 4, 4), layout)
    with pytest.raises(PositionError, match="does not have the 4 placeholder tokens"):
        qwen2_5_rope_positions(prompt.ids[:-2] + prompt.ids[-1:], prompt.layout(), layout)
    with pytest.raises(PositionError, match="more audio inputs than placeholders"):
        qwen2_5_rope_positions(prompt.ids, MediaLayout(audio_token_counts=(3,), image_grids=((1, 4, 4),)), layout)


# -------------------------------------------------------------------------------------------------- encoders


def test_audio_encoder_matches_the_reference(ckpt, ours):
    """Lengths: a multiple of the 200-frame chunk, shorter than one chunk, and ragged; run in groups of 2 chunks."""
    features = [torch.randn(128, n, generator=torch.Generator().manual_seed(n)) for n in (400, 57, 611)]
    lengths = torch.tensor([f.shape[1] for f in features])
    with torch.no_grad():
        theirs = ckpt.reference.thinker.model.audio_tower(torch.cat(features, dim=1), feature_lens=lengths)
        mine = torch.cat(ours.thinker.audio_tower(features, group_chunks=2))
    assert mine.shape[0] == sum(audio_token_count(int(n)) for n in lengths)
    torch.testing.assert_close(mine, theirs.last_hidden_state, atol=ATOL, rtol=0)


def test_vision_encoder_matches_the_reference(ckpt, ours):
    """Frames whose merged grids the 4x4 windows do not divide, a video, and groups of a few frames."""
    grid = torch.tensor([[1, 12, 20], [3, 8, 8], [1, 2, 30]])
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_NUMEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = ckpt.reference.thinker.model.visual(pixels, grid_thw=grid).pooler_output
        mine = ours.thinker.visual(pixels, grid, group_patches=100)
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- preprocessing


def test_image_patches_match_the_reference_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 171, 3), dtype=np.uint8))
    processor = Qwen2VLImageProcessorPil(min_pixels=QWEN2_5_VISION.min_pixels, max_pixels=QWEN2_5_VISION.max_pixels)
    expected = processor(images=[image], return_tensors="pt")
    patches, grid = image_patches(image, QWEN2_5_VISION)
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(patches, expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("samples", [16000, 16037, 799])
def test_audio_features_match_the_reference_extractor(samples):
    from transformers import WhisperFeatureExtractor

    wave = (np.random.default_rng(samples).standard_normal(samples) * 0.1).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                        chunk_length=30, padding_value=0.0, return_attention_mask=True)
    out = extractor(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    expected = out["input_features"][0][:, out["attention_mask"][0].bool()]
    torch.testing.assert_close(qwen2_5_audio_features(wave), expected, atol=1e-5, rtol=0)
