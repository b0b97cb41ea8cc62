"""Chat messages with media -> token ids with every placeholder expanded, plus the prepared media, in prompt order.

    {"type": "text", "text": ...}                       -> the text
    {"type": "audio", "audio": path|bytes|data URL|(array, rate)}
                                                        -> <|audio_start|> <|audio_pad|> * n <|audio_end|>
    {"type": "image", "image": path|bytes|data URL|PIL} -> <|vision_start|> <|image_pad|> * n <|vision_end|>
    {"type": "video", "video": path|bytes|frames}       -> <|vision_start|> <|video_pad|> * n <|vision_end|>
    video with use_audio_in_video                       -> <|vision_start|><|audio_start|> video and audio pads
                                                           interleaved by time <|audio_end|><|vision_end|>

The ChatML text is rendered with one pad per item and tokenized (pads are atomic special tokens, so no text token
crosses one); then each pad is replaced by its item's run of pads. Message text, tool definitions and tool results
are the caller's pieces of that text: control-token strings in them are tokenized as ordinary text (unless
`MediaOptions.trusted_text`), so only the builder places control tokens. Every input error raised while a part is
prepared carries the part's place (InputError.location). Earlier assistant turns lose their
`<think>...</think>` blocks, as the Thinking model's template does. Remote URLs are fetched only when allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ThinkerConfig
from ..shapes import audio_token_count
from ..shapes import downsampled_length
from .audio import AudioFeatureConfig, load_audio, log_mel_features
from .positions import MediaLayout, VideoGrid, interleave_by_time, vision_positions
from ..errors import InputError
from .prompt import ROLES, ChatTemplate, PromptError, PromptText
from .tokenizer import Tokenizer, check_encodable
from .tools import render_tool_calls, render_tool_response, render_tools
from .video import load_video
from .vision import VisionProcessorConfig, image_patches, video_patches

PART_ALIASES = {"image_url": "image", "audio_url": "audio", "input_audio": "audio", "video_url": "video"}
MEDIA_KINDS = ("image", "audio", "video")
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class MediaFetchError(PromptError):
    """A remote media URL was given but fetching is not allowed, or it failed."""


@dataclass
class AudioItem:
    features: torch.Tensor  # (mel bins, frames) log-mel
    token_count: int


@dataclass
class ImageItem:
    patches: torch.Tensor  # (patches, channels * temporal_patch * patch * patch)
    grid_thw: tuple[int, int, int]


@dataclass
class VideoItem:
    patches: torch.Tensor
    grid_thw: tuple[int, int, int]
    seconds_per_grid: float
    audio: AudioItem | None = None  # its sound track, when use_audio_in_video


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    audios: list[AudioItem] = field(default_factory=list)  # in the order their tokens appear (video tracks included)
    images: list[ImageItem] = field(default_factory=list)
    videos: list[VideoItem] = field(default_factory=list)
    use_audio_in_video: bool = False

    @property
    def layout(self) -> MediaLayout:
        return MediaLayout(tuple(a.token_count for a in self.audios), tuple(i.grid_thw for i in self.images),
                           tuple(VideoGrid(v.grid_thw, v.seconds_per_grid) for v in self.videos))

    @property
    def has_media(self) -> bool:
        return bool(self.audios or self.images or self.videos)


@dataclass(frozen=True)
class MediaOptions:
    """How prompts are prepared. Audio (video sound tracks included) is bounded by `max_audio_seconds`, or when None
    by what the model's context holds; videos by `max_video_seconds` (None: no limit). `trusted_text`: message text
    may write control tokens (the old behaviour, for callers that write their own ChatML)."""

    audio: AudioFeatureConfig
    vision: VisionProcessorConfig
    allow_remote: bool = False
    max_audio_seconds: float | None = None
    max_video_seconds: float | None = None
    trusted_text: bool = False


def _resolve_source(value: Any, options: MediaOptions, where: str) -> Any:
    """OpenAI-style wrappers ({"url": ...}, {"data", "format"}) -> the value; remote URLs only when allowed."""
    if isinstance(value, dict):
        if "url" in value:
            value = value["url"]
        elif "data" in value:
            value = f"data:audio/{value.get('format', 'wav')};base64,{value['data']}"
        else:
            raise PromptError(f"{where}: media object needs 'url' or 'data', got keys {sorted(value)}")
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        if not options.allow_remote:
            raise MediaFetchError(f"{where}: remote URL {value[:80]!r} given but fetching remote media is not allowed")
        return _fetch(value, where)
    if isinstance(value, str) and value.startswith("file://"):
        return Path(value[len("file://"):])
    return value


def _fetch(url: str, where: str, limit: int = 256 * 2**20) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (scheme checked by the caller)
            data = response.read(limit + 1)
    except (OSError, ValueError) as error:  # ValueError: a URL urllib cannot parse (bad IPv6 literal, bad port)
        raise MediaFetchError(f"{where}: could not fetch {url[:80]!r} ({error})") from None
    if len(data) > limit:
        raise MediaFetchError(f"{where}: {url[:80]!r} is larger than {limit} bytes")
    return data


def audio_seconds_limit(options: MediaOptions, cfg: ThinkerConfig) -> float:
    """The longest audio input: the configured limit, or the length whose tokens fill the model's context."""
    if options.max_audio_seconds is not None:
        return options.max_audio_seconds
    chunk_frames = 2 * cfg.audio.n_window  # the encoder's chunk: its tokens and its seconds
    chunk_seconds = chunk_frames * options.audio.hop_length / options.audio.sampling_rate
    return cfg.text.max_position_embeddings / downsampled_length(chunk_frames) * chunk_seconds


def prepare_audio(source: Any, options: MediaOptions, cfg: ThinkerConfig) -> AudioItem:
    wave = load_audio(source, cfg=options.audio, max_seconds=audio_seconds_limit(options, cfg))
    features = log_mel_features(wave, options.audio)
    return AudioItem(features, audio_token_count(features.shape[1], cfg.audio.n_window))


def prepare_video(source: Any, options: MediaOptions, cfg: ThinkerConfig, with_audio: bool) -> VideoItem:
    if isinstance(source, (list, tuple)) or hasattr(source, "shape"):
        frames, fps = source, options.vision.video_fps  # already-sampled frames at the configured rate
    else:
        frames, fps = load_video(source, options.vision, options.max_video_seconds)
    patches, grid, seconds = video_patches(frames, fps, options.vision)
    audio = prepare_audio(source, options, cfg) if with_audio else None
    return VideoItem(patches, tuple(int(x) for x in grid.reshape(-1).tolist()), float(seconds), audio)


def _content_parts(message: Any, index: int) -> tuple[str, list[dict]]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise PromptError(f"message {index} must be an object with a role among {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        return message["role"], []  # an assistant turn that only called tools
    if isinstance(content, str):
        return message["role"], [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise PromptError(f"message {index} content must be a string or a list of parts, got {content!r:.80}")
    return message["role"], content


def _media_value(part: dict, kind: str, where: str) -> Any:
    for key in (part.get("type"), kind):
        if key in part and part[key] is not None:
            return part[key]
    raise PromptError(f"{where}: a {part.get('type')!r} part needs a {part.get('type')!r} field with the media")


class _PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, cfg: ThinkerConfig, options: MediaOptions, use_audio_in_video: bool,
                 template: ChatTemplate = ChatTemplate()):
        self.tokenizer, self.cfg, self.options, self.template = tokenizer, cfg, options, template
        self.use_audio_in_video = use_audio_in_video
        self.pending: dict[str, list] = {kind: [] for kind in MEDIA_KINDS}  # prepared, awaiting expansion
        self.placeholder = {  # one pad per item in the rendered text
            "image": "<|vision_start|><|image_pad|><|vision_end|>",
            "audio": "<|audio_start|><|audio_pad|><|audio_end|>",
            "video": "<|vision_start|><|video_pad|><|vision_end|>",
        }

    def render_part(self, role: str, part: Any, where: str) -> PromptText:
        kind = part.get("type") if isinstance(part, dict) else None
        kind = PART_ALIASES.get(kind, kind)
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"{where}: a text part needs a string 'text', got {text!r:.80}")
            check_encodable(text, where)
            return PromptText().caller(THINK_BLOCK.sub("", text) if role == "assistant" else text)
        if kind not in MEDIA_KINDS:
            raise PromptError(f"{where}: unknown part type {kind!r}; expected text, image, audio or video")
        source = _resolve_source(_media_value(part, kind, where), self.options, where)
        self.pending[kind].append(self.prepare_item(kind, source))
        return PromptText().builder(self.placeholder[kind])

    def prepare_item(self, kind: str, source: Any) -> AudioItem | ImageItem | VideoItem:
        """One media part's features (a family's builder overrides this and the two hooks below)."""
        if kind == "audio":
            return prepare_audio(source, self.options, self.cfg)
        if kind == "image":
            patches, grid = image_patches(source, self.options.vision)
            return ImageItem(patches, tuple(int(x) for x in grid.reshape(-1).tolist()))
        return prepare_video(source, self.options, self.cfg, self.use_audio_in_video)

    def pad_ids(self) -> dict[str, int]:
        """Each media kind's placeholder token id."""
        return {"image": self.cfg.image_token_id, "audio": self.cfg.audio_token_id, "video": self.cfg.video_token_id}

    def merge_size(self) -> int:
        return self.cfg.vision.spatial_merge_size

    def render(self, messages: list, add_generation_prompt: bool, tools: list | None = None) -> PromptText:
        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list of {'role', 'content'} objects")
        t, out = self.template, PromptText()
        if tools and not (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
            out.builder(f"{t.im_start}system\n").add(render_tools(tools, None)).builder(f"{t.im_end}\n")
        for index, message in enumerate(messages):
            try:
                out.add(self._message(messages, index, tools))
            except InputError as error:
                raise error.at(index) from None
        if add_generation_prompt:
            out.builder(f"{t.im_start}assistant\n")
        return out

    def _message(self, messages: list, index: int, tools: list | None) -> PromptText:
        message, t = messages[index], self.template
        if isinstance(message, dict) and message.get("role") == "tool":
            return self._tool_result(messages, index)
        role, parts = _content_parts(message, index)
        body = PromptText()
        for j, part in enumerate(parts):
            try:
                body.add(self.render_part(role, part, f"message {index} part {j}"))
            except InputError as error:
                raise error.at(index, j) from None
        if role == "system" and index == 0 and tools:
            body = render_tools(tools, body)
        if role == "assistant" and message.get("tool_calls"):
            body.add(render_tool_calls(message["tool_calls"], f"message {index}", first_on_new_line=bool(body)))
        return PromptText().builder(f"{t.im_start}{role}\n").add(body).builder(f"{t.im_end}\n")

    def _tool_result(self, messages: list, index: int) -> PromptText:
        """Consecutive tool results share one user turn of <tool_response> blocks."""
        content = messages[index].get("content")
        if not isinstance(content, str):
            raise PromptError(f"message {index}: a tool message needs string content, got {content!r:.80}")
        previous_is_tool = index > 0 and isinstance(messages[index - 1], dict) and messages[index - 1].get(
            "role") == "tool"
        next_is_tool = index + 1 < len(messages) and isinstance(messages[index + 1], dict) and messages[
            index + 1].get("role") == "tool"
        out = PromptText().builder("" if previous_is_tool else f"{self.template.im_start}user")
        out.builder("\n").add(render_tool_response(content))
        return out.builder("" if next_is_tool else f"{self.template.im_end}\n")

    def expand(self, ids: list[int]) -> PreparedPrompt:
        merge = self.merge_size()
        queues = {token: (kind, self.pending[kind]) for kind, token in self.pad_ids().items()}
        out = PreparedPrompt([], use_audio_in_video=self.use_audio_in_video)
        for token in ids:
            if token not in queues:
                out.token_ids.append(token)
                continue
            kind, queue = queues[token]
            if not queue:
                raise PromptError(f"the prompt holds more {kind} placeholders than {kind} inputs (does the text "
                                  f"contain a literal placeholder token?)")
            item = queue.pop(0)
            if kind == "audio":
                out.audios.append(item)
                out.token_ids += [token] * item.token_count
            elif kind == "image":
                out.images.append(item)
                out.token_ids += [token] * (item.grid_thw[0] * item.grid_thw[1] * item.grid_thw[2] // merge**2)
            else:
                out.videos.append(item)
                out.token_ids += self._video_tokens(item)
                if item.audio is not None:
                    out.audios.append(item.audio)
        leftover = [kind for kind, queue in queues.values() if queue]
        if leftover:
            raise PromptError(f"more {' and '.join(leftover)} inputs than placeholders in the prompt")
        return out

    def _video_tokens(self, item: VideoItem) -> list[int]:
        cfg = self.cfg
        video_pos = vision_positions(item.grid_thw, cfg.vision.spatial_merge_size, item.seconds_per_grid,
                                     cfg.position_id_per_seconds, torch.tensor(0.0))
        if item.audio is None:
            return [cfg.video_token_id] * video_pos.shape[1]
        audio_pos = torch.arange(item.audio.token_count, dtype=torch.float32).expand(3, -1)
        _, kinds = interleave_by_time(video_pos, audio_pos)
        body = [cfg.video_token_id if kind == "video" else cfg.audio_token_id for kind in kinds]
        return [cfg.audio_start_token_id] + body + [cfg.audio_end_token_id]


def build_prompt(messages: list, tokenizer: Tokenizer, cfg: ThinkerConfig, options: MediaOptions,
                 use_audio_in_video: bool = False, add_generation_prompt: bool = True,
                 tools: list | None = None) -> PreparedPrompt:
    builder = _PromptBuilder(tokenizer, cfg, options, use_audio_in_video)
    text = builder.render(messages, add_generation_prompt, tools)
    return builder.expand(tokenizer.encode_pieces(text.pieces, split_special=not options.trusted_text))
