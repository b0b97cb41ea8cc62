"""Qwen2.5-Omni's prompts: the chat messages -> token ids with every placeholder expanded, and the prepared media.

The same ChatML and the same message parts as Qwen3-Omni (processing/multimodal.py, whose builder this one extends);
what differs is the family's:
    placeholders   <|audio_bos|><|AUDIO|><|audio_eos|>, <|vision_bos|><|IMAGE|><|vision_eos|>,
                   <|vision_bos|><|VIDEO|><|vision_eos|> (written from the config's ids, so a checkpoint's own
                   tokenizer spells them); a video with its audio: <|vision_bos|><|audio_bos|> video and audio
                   pads in 2-second chunks <|audio_eos|><|vision_eos|> (qwen2_5_positions.video_with_audio_tokens)
    audio          its log-mel (qwen2_5_inputs.qwen2_5_audio_features) and token count (25 a second)
    images/videos  patch 14, merge 2, CLIP's mean and std (qwen2_5_inputs.QWEN2_5_VISION) unless the checkpoint's
                   preprocessor_config.json says otherwise
    speech         the talker was trained under one system prompt (config_qwen2_5.SPEECH_SYSTEM_PROMPT): a spoken
                   request without a system message gets it; one with another system message keeps it, with the
                   warning the reference's release gives ("audio output may not work as expected").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config_qwen2_5 import SPEECH_SYSTEM_PROMPT, Qwen25ThinkerConfig, audio_token_count
from .audio import AudioFeatureConfig, load_audio
from .multimodal import AudioItem, MediaOptions, PreparedPrompt, VideoItem, _PromptBuilder
from .positions import VideoGrid
from .qwen2_5_inputs import QWEN2_5_AUDIO, QWEN2_5_VISION, qwen2_5_audio_features
from .qwen2_5_positions import video_with_audio_tokens
from .tokenizer import Tokenizer
from .video import load_video
from .vision import VisionProcessorConfig, video_patches

log = logging.getLogger("thinktalk")
PREPROCESSOR_FILE = "preprocessor_config.json"
SPEECH_PROMPT_WARNING = ("the system prompt is not Qwen2.5-Omni's speech prompt ({!r}); the talker was trained under "
                         "that one only, so audio output may not work as expected")


def qwen2_5_media_options(directory: Path, allow_remote: bool = False) -> MediaOptions:
    """The checkpoint's preprocessor numbers when it ships them, else the released Qwen2.5-Omni ones."""
    has_file = (Path(directory) / PREPROCESSOR_FILE).is_file()
    audio = AudioFeatureConfig.from_dir(directory) if has_file else QWEN2_5_AUDIO
    vision = VisionProcessorConfig.from_dir(directory) if has_file else QWEN2_5_VISION
    return MediaOptions(audio, vision, allow_remote=allow_remote)


def with_speech_system_prompt(messages: list, speaks: bool) -> list:
    """A spoken request's messages under the talker's system prompt (see the module doc); others unchanged."""
    if not speaks or not isinstance(messages, list) or not messages:
        return messages
    first = messages[0]
    if not (isinstance(first, dict) and first.get("role") == "system"):
        return [{"role": "system", "content": SPEECH_SYSTEM_PROMPT}] + list(messages)
    if _text_of(first.get("content")) != SPEECH_SYSTEM_PROMPT:
        log.warning(SPEECH_PROMPT_WARNING.format(SPEECH_SYSTEM_PROMPT))
    return messages


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict):
        return content[0].get("text")
    return None


class Qwen25PromptBuilder(_PromptBuilder):
    def __init__(self, tokenizer: Tokenizer, cfg: Qwen25ThinkerConfig, options: MediaOptions,
                 use_audio_in_video: bool):
        super().__init__(tokenizer, cfg, options, use_audio_in_video)
        layout = cfg.layout

        def spell(*ids: int) -> str:
            return "".join(tokenizer.decode([i]) for i in ids)

        self.placeholder = {
            "image": spell(layout.vision_start_token_id, layout.image_token_id, layout.vision_end_token_id),
            "audio": spell(layout.audio_start_token_id, layout.audio_token_id, layout.audio_end_token_id),
            "video": spell(layout.vision_start_token_id, layout.video_token_id, layout.vision_end_token_id),
        }

    def pad_ids(self) -> dict[str, int]:
        layout = self.cfg.layout
        return {"image": layout.image_token_id, "audio": layout.audio_token_id, "video": layout.video_token_id}

    def merge_size(self) -> int:
        return self.cfg.layout.spatial_merge_size

    def prepare_item(self, kind: str, source: Any):
        if kind == "audio":
            return self._audio(source)
        if kind == "image":
            return super().prepare_item(kind, source)
        if isinstance(source, (list, tuple)) or hasattr(source, "shape"):
            frames, fps = source, self.options.vision.video_fps  # already-sampled frames at the configured rate
        else:
            frames, fps = load_video(source, self.options.vision, self.options.max_video_seconds)
        patches, grid, seconds = video_patches(frames, fps, self.options.vision)
        audio = self._audio(source) if self.use_audio_in_video else None
        return VideoItem(patches, tuple(int(x) for x in grid.reshape(-1).tolist()), float(seconds), audio)

    def _audio(self, source: Any) -> AudioItem:
        """25 tokens a second: at most what the context holds, unless the options bound it lower."""
        limit = self.options.max_audio_seconds
        if limit is None:
            limit = self.cfg.text.max_position_embeddings / self.cfg.layout.position_id_per_seconds
        wave = load_audio(source, cfg=self.options.audio, max_seconds=limit)
        features = qwen2_5_audio_features(wave, self.options.audio)
        return AudioItem(features, audio_token_count(features.shape[1]))

    def _video_tokens(self, item: VideoItem) -> list[int]:
        layout = self.cfg.layout
        grid = item.grid_thw
        if item.audio is None:
            return [layout.video_token_id] * (grid[0] * grid[1] * grid[2] // layout.spatial_merge_size ** 2)
        inner = video_with_audio_tokens(VideoGrid(grid, item.seconds_per_grid), item.audio.token_count, layout)
        return [layout.audio_start_token_id] + inner + [layout.audio_end_token_id]


def build_qwen2_5_prompt(messages: list, tokenizer: Tokenizer, cfg: Qwen25ThinkerConfig, options: MediaOptions,
                         use_audio_in_video: bool = False, tools: list | None = None) -> PreparedPrompt:
    builder = Qwen25PromptBuilder(tokenizer, cfg, options, use_audio_in_video)
    text = builder.render(messages, True, tools)
    return builder.expand(tokenizer.encode_pieces(text.pieces, split_special=not options.trusted_text))
