"""What a caller asks for: one typed request, the thinker's sampling and the talker's speech, resolved against the
checkpoint's defaults in one place (`resolve`), so that every way in (Omni.generate / stream, the HTTP API, the
Realtime socket, the CLI) means the same thing by the same option.

    GenerationRequest(messages, sampling=SamplingParams(...), speech=SpeechParams(...) | None, tools, ...)
        SamplingParams  the thinker: do_sample, temperature, top_k, top_p, repetition_penalty, seed,
                        max_new_tokens (text tokens), stop_token_ids; None = the checkpoint's generation_config
        SpeechParams    the talker: voice, its own sampling, max_seconds (None = the runaway-speech guard's bound),
                        ceiling_seconds (a cap that leaves the guard on), chunk_frames; speech=None: text only
        TemplateOptions the chat template's options: enable_thinking, other template variables (chat_template_kwargs)
        ResponseFormat  the reply's shape: free text, any JSON object, or JSON matching a schema (grammar-constrained)
        ToolChoice      with tools: "auto" (the model decides), "required" (at least one call), or one named function

The talker's budget is counted in seconds of speech here, and in codec frames (12.5 a second) inside the engine;
its internal token budget is frames + 1 (the token after the last frame is codec EOS or never used).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import OmniConfig, SamplingConfig
from .errors import RequestError
from .processing.chat_template import TemplateOptions

FRAMES_PER_SECOND = 12.5  # Qwen3-Omni's codec frame rate (24 kHz / 1920 samples)
# The runaway-speech guard: a talker that never emits codec EOS (a known failure of these models, and what every
# random-weight checkpoint does) may speak at most this long per text token of its reply, plus a margin, and never
# past the checkpoint's own talker budget. Natural speech takes about 0.3 s per Qwen token; 1 s is three times that.
GUARD_SECONDS_PER_TEXT_TOKEN = 1.0
GUARD_MARGIN_SECONDS = 5.0
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: im_end and the checkpoint's eos ids
    logprobs: int | None = None  # k: each reply token's log-probability and the k most likely (None: none)


@dataclass(frozen=True)
class SpeechParams:
    voice: str | None = None  # None: the checkpoint's default voice
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_seconds: float | None = None  # None: the runaway-speech guard (see the module doc)
    ceiling_seconds: float | None = None  # a hard cap that keeps the guard on (a server's own limit), or None
    chunk_frames: int = 1  # codec frames per Code2Wav call, and per AudioChunk


@dataclass(frozen=True)
class ResponseFormat:
    """What the reply's text must be; JSON formats constrain decoding with a grammar (engine/constraints.py).

    type "text": anything; "json_object": one JSON object; "json_schema": JSON valid against `schema`. `strict`
    refuses a schema using keywords the grammar compiler does not implement (otherwise they are not enforced)."""

    type: str = "text"  # "text" | "json_object" | "json_schema"
    schema: dict | None = None  # json_schema only
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    """Which tool calls the reply must make when tools are offered. mode "auto": the model decides (unconstrained);
    "required": the reply is one or more calls to offered tools; `function` (a name): one call to that function.
    `parallel`: "required" may make more than one call (OpenAI's parallel_tool_calls); a named function is called
    once."""

    mode: str = "auto"  # "auto" | "required"
    function: str | None = None
    parallel: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    messages: list
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speech: SpeechParams | None = None
    tools: list | None = None
    use_audio_in_video: bool = False
    response_format: ResponseFormat | None = None  # None: free text
    tool_choice: ToolChoice | None = None  # None: "auto"
    template: TemplateOptions = field(default_factory=TemplateOptions)  # the chat template's options


@dataclass(frozen=True)
class ResolvedSpeech:
    """SpeechParams against the checkpoint: the voice's codec id, the talker's sampling (max_new_tokens = the
    hard frame budget + 1), and whether the runaway guard bounds it by the text."""

    speaker_id: int
    sampling: SamplingConfig
    chunk_frames: int
    guarded: bool  # no max_seconds was given: frames <= guard_frames(text tokens)
    seed: int | None

    @property
    def max_frames(self) -> int:
        return self.sampling.max_new_tokens - 1


def guard_frames(text_tokens: int) -> int:
    """The most frames the runaway guard lets a reply of `text_tokens` text tokens speak."""
    return math.ceil((GUARD_SECONDS_PER_TEXT_TOKEN * text_tokens + GUARD_MARGIN_SECONDS) * FRAMES_PER_SECOND)


def _given(params) -> dict:
    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    return {k: v for k, v in dataclasses.asdict(params).items() if k in names and v is not None}


def resolve_sampling(cfg: OmniConfig, params: SamplingParams) -> SamplingConfig:
    """The checkpoint's thinker defaults overridden by what `params` sets; RequestError names a bad value."""
    _check_types(params, {"max_new_tokens": int, "top_k": int, "seed": int, "logprobs": int}, "sampling")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"sampling logprobs (top_logprobs) must be in [0, {MAX_TOP_LOGPROBS}], got "
                           f"{params.logprobs}", param="top_logprobs")
    try:
        return dataclasses.replace(cfg.thinker_sampling, **_given(params))
    except ValueError as error:
        raise RequestError(str(error)) from None


def resolve_speech(cfg: OmniConfig, speech: SpeechParams, default_voice: str, seed: int | None) -> ResolvedSpeech:
    _check_types(speech, {"top_k": int, "chunk_frames": int}, "speech")
    if speech.chunk_frames < 1:
        raise RequestError(f"speech chunk_frames (audio_chunk_frames) must be at least 1, got {speech.chunk_frames}")
    checkpoint = cfg.talker_sampling
    frames = checkpoint.max_new_tokens - 1
    for name in ("max_seconds", "ceiling_seconds"):
        seconds = getattr(speech, name)
        if seconds is None:
            continue
        if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0):
            raise RequestError(f"speech {name} must be a positive number, got {seconds!r}")
        frames = min(frames, max(1, round(seconds * FRAMES_PER_SECOND)))
    try:
        sampling = dataclasses.replace(checkpoint, **{**_given(speech), "max_new_tokens": frames + 1})
        speaker = cfg.talker.speaker_id(speech.voice or default_voice)
    except ValueError as error:
        raise RequestError(f"speech: {error}") from None
    return ResolvedSpeech(speaker, sampling, speech.chunk_frames, speech.max_seconds is None, seed)


def _check_types(params, integers: dict[str, type], what: str) -> None:
    for name in integers:
        value = getattr(params, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"{what} {name} must be an integer, got {value!r}")
