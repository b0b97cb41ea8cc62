"""A Chat Completions request -> Omni messages and `Omni.stream` options; stop strings; tool calls in OpenAI form.

Media parts are fetched and checked here (see media.py) and passed on already loaded, so `Omni` never fetches.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field

from ..processing.tools import ToolCall
from ..processing.chat_template import TemplateOptions
from ..requests import GenerationRequest, ResponseFormat, SamplingParams, SpeechParams, ToolChoice
from .errors import APIError, bad_request
from .media import MediaPolicy, checked_audio, checked_image, checked_video, decode_base64, fetch
from .schemas import (AudioOptions, ChatCompletionRequest, ChatMessage, FunctionCall, ServerLimits,
                      ToolCallModel)

TOOL_CALL_MARKER = "<tool_call>"
MAX_STOPS = 4


@dataclass
class MediaCount:
    image: int = 0
    audio: int = 0
    video: int = 0

    def add(self, kind: str, limits: ServerLimits, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        limit = {"image": limits.max_images, "audio": limits.max_audios, "video": limits.max_videos}[kind]
        if getattr(self, kind) > limit:
            raise bad_request(f"{where}: more than {limit} {kind} inputs in one request (max_{kind}s)", param=where,
                              code="too_many_media")


def _part(part, where: str, policy: MediaPolicy, count: MediaCount, chars: list[int], with_audio: bool) -> dict:
    limits = policy.limits
    if part.type == "text":
        chars[0] += len(part.text)
        return {"type": "text", "text": part.text}
    if part.type == "image_url":
        count.add("image", limits, where)
        return {"type": "image", "image": checked_image(fetch(part.image_url.url, where, policy), where, limits)}
    if part.type == "input_audio":
        count.add("audio", limits, where)
        data = decode_base64(part.input_audio.data, where, limits.max_media_bytes)
        return {"type": "audio", "audio": checked_audio(data, where, limits)}
    if part.type == "audio_url":
        count.add("audio", limits, where)
        return {"type": "audio", "audio": checked_audio(fetch(part.audio_url.url, where, policy), where, limits)}
    count.add("video", limits, where)
    return {"type": "video", "video": checked_video(part.video_url.url, where, policy, with_audio)}


def _message(message: ChatMessage, index: int, policy: MediaPolicy, count: MediaCount, chars: list[int],
             with_audio: bool) -> dict:
    where = f"messages[{index}]"
    role = "system" if message.role == "developer" else message.role
    content = message.content
    if role == "tool" or (role in ("system", "assistant") and isinstance(content, list)):
        if isinstance(content, list) and any(part.type != "text" for part in content):
            raise bad_request(f"{where}: a {message.role} message may hold only text", param=f"{where}.content")
        content = content if isinstance(content, str) or content is None else "".join(p.text for p in content)
    if isinstance(content, str):
        chars[0] += len(content)
        out: dict = {"role": role, "content": content}
    elif content is None:
        if not message.tool_calls:
            raise bad_request(f"{where}: content is required", param=f"{where}.content")
        out = {"role": role, "content": None}
    else:
        out = {"role": role, "content": [_part(p, f"{where}.content[{j}]", policy, count, chars, with_audio)
                                         for j, p in enumerate(content)]}
    if role == "tool" and out["content"] is None:
        raise bad_request(f"{where}: a tool message needs content", param=f"{where}.content")
    if message.tool_calls:
        if role != "assistant":
            raise bad_request(f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return out


def build_messages(request: ChatCompletionRequest, policy: MediaPolicy) -> list[dict]:
    """Omni's messages, media loaded and checked. Blocking (decoding, maybe fetching): run off the event loop.
    Videos pass on as their bytes (a file:// URL: as the allowed path), probed but not decoded."""
    count, chars = MediaCount(), [0]
    with_audio = request.use_audio_in_video
    messages = [_message(m, i, policy, count, chars, with_audio) for i, m in enumerate(request.messages)]
    if chars[0] > policy.limits.max_text_chars:
        raise bad_request(f"the request holds {chars[0]} characters of text, over the limit of "
                          f"{policy.limits.max_text_chars} (max_text_chars)", param="messages", code="text_too_long")
    return messages


# OpenAI request fields this server does not implement -> the values that ask for nothing (the field's no-op).
# Any other value is a 400 naming the field.
UNSUPPORTED = {"n": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
               "store": (None, False), "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
               "verbosity": (None,), "prediction": (None,), "web_search_options": (None,), "functions": (None,),
               "function_call": (None,), "prompt_cache_retention": (None,)}


@dataclass(frozen=True)
class StreamSettings:
    """What the request asked for, checked against the model and the limits: the engine's typed request (without
    its messages, which are prepared apart) and how the reply is shaped for the client."""

    request: GenerationRequest  # messages empty; `for_messages` fills them in
    audio_format: str
    stops: tuple[str, ...]
    tools_offered: bool
    logprobs: bool = False  # report choices[].logprobs (top_logprobs alternatives: request.sampling.logprobs)
    parallel_tool_calls: bool = True  # False: only the reply's first tool call is returned

    @property
    def want_audio(self) -> bool:
        return self.request.speech is not None

    def for_messages(self, messages: list) -> GenerationRequest:
        return dataclasses.replace(self.request, messages=messages)


def stream_settings(request: ChatCompletionRequest, voices: list[str], has_talker: bool, formats: tuple[str, ...],
                    limits: ServerLimits) -> StreamSettings:
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise bad_request(f"{name} {max_tokens} is over this server's limit of {limits.max_tokens} (max_tokens)",
                          param=name, code="max_tokens_exceeded")
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
        raise bad_request(f"stop takes at most {MAX_STOPS} non-empty strings of at most 256 characters",
                          param="stop")
    _refuse_unsupported(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    tools = _offered_tools(request)
    want_audio = "audio" in (request.modalities or ["text"])
    options = request.audio or AudioOptions()
    engine_request = GenerationRequest(
        messages=[], sampling=_sampling(request, max_tokens),
        speech=_speech(options, voices, has_talker, formats, limits, request.stream) if want_audio else None,
        tools=tools or None, use_audio_in_video=request.use_audio_in_video,
        response_format=_response_format(request), tool_choice=_tool_choice(request) if tools else None,
        template=TemplateOptions(None, request.chat_template_kwargs or {}))
    return StreamSettings(engine_request, options.format, stops, bool(tools), bool(request.logprobs),
                          request.parallel_tool_calls is not False)


def _sampling(request: ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """OpenAI's sampling fields as the thinker's: temperature 0 is greedy; either of temperature / top_p samples;
    neither leaves the checkpoint's generation_config in charge."""
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    if request.temperature == 0:
        return SamplingParams(max_new_tokens=max_tokens, do_sample=False, seed=request.seed, logprobs=logprobs)
    samples = True if request.temperature is not None or request.top_p is not None else None
    return SamplingParams(max_new_tokens=max_tokens, do_sample=samples, temperature=request.temperature,
                          top_p=request.top_p, seed=request.seed, logprobs=logprobs)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    for name, no_ops in UNSUPPORTED.items():
        value = getattr(request, name)
        if value not in no_ops:
            raise bad_request(f"{name} is not supported by this server (got {str(value)[:64]!r})", param=name,
                              code="unsupported_parameter")


def _tool_choice(request: ChatCompletionRequest) -> ToolChoice | None:
    """tool_choice as the engine's: "required" and a named function force a call (a grammar); "auto" (None)
    leaves it free."""
    choice, parallel = request.tool_choice, request.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return None
    if choice == "required":
        return ToolChoice("required", parallel=parallel)
    return ToolChoice(function=choice.function.name)


def _response_format(request: ChatCompletionRequest) -> ResponseFormat | None:
    form = request.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return ResponseFormat("json_object")
    return ResponseFormat("json_schema", form.json_schema.schema_ if form.json_schema.schema_ is not None
                          else {}, form.json_schema.strict is True)


def _speech(options: AudioOptions, voices: list[str], has_talker: bool, formats: tuple[str, ...],
            limits: ServerLimits, stream: bool) -> SpeechParams:
    """audio: {voice, format, max_seconds} as the talker's. Without max_seconds the runaway-speech guard bounds the
    reply by its text (requests.py), and the server's max_audio_output_seconds caps it either way."""
    if not has_talker:
        raise bad_request("audio output was requested but this model has no talker (text only)",
                          param="modalities", code="audio_unsupported")
    if options.format not in formats or (stream and options.format not in ("pcm16", "wav")):
        usable = [f for f in formats if not stream or f in ("pcm16", "wav")]
        raise bad_request(f"audio format {options.format!r} is not available{' when streaming' if stream else ''}; "
                          f"use one of {', '.join(usable)}", param="audio.format", code="unsupported_format")
    if options.voice is not None and options.voice.lower() not in voices:
        raise bad_request(f"unknown voice {options.voice[:64]!r}; this model has {', '.join(voices)}",
                          param="audio.voice", code="invalid_voice")
    ceiling = limits.max_audio_output_seconds
    return SpeechParams(voice=options.voice.lower() if options.voice is not None else None,
                        max_seconds=None if options.max_seconds is None else min(options.max_seconds, ceiling),
                        ceiling_seconds=ceiling)


def _offered_tools(request: ChatCompletionRequest) -> list[dict]:
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    choice = request.tool_choice
    if choice == "none" or not tools:
        return []
    if choice is not None and not isinstance(choice, str):
        if not any(t["function"]["name"] == choice.function.name for t in tools):
            raise bad_request(f"tool_choice names {choice.function.name[:64]!r}, which is not among the tools",
                              param="tool_choice")
    return tools  # all of them, as OpenAI shows them; a named choice forces the call (_tool_choice)


def openai_tool_calls(calls: tuple[ToolCall, ...] | list[ToolCall]) -> list[ToolCallModel]:
    """GenerationResult.tool_calls -> OpenAI's tool_calls, each with a fresh id and its arguments as JSON text."""
    return [ToolCallModel(id=f"call_{secrets.token_hex(12)}",
                          function=FunctionCall(name=call.name, arguments=json.dumps(call.arguments,
                                                                                     ensure_ascii=False)))
            for call in calls]


@dataclass
class TextGate:
    """Text as it may be sent: cut at the first stop string; held back from a `<tool_call>` marker on (when
    tools were offered); a tail that might begin a stop string or marker waits for the next piece."""

    stops: tuple[str, ...]
    markers: tuple[str, ...] = ()
    pending: str = ""
    sent: list[str] = field(default_factory=list)
    stopped: bool = False
    holding: bool = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        if self.holding:
            return self._check_stop_only()
        cuts = [(self.pending.find(s), True) for s in self.stops if s in self.pending]
        cuts += [(self.pending.find(m), False) for m in self.markers if m in self.pending]
        if cuts:
            at, is_stop = min(cuts)
            out, self.pending = self.pending[:at], ("" if is_stop else self.pending[at:])
            self.stopped, self.holding = is_stop, not is_stop
            return self._send(out)
        keep = max([k for s in self.stops + self.markers for k in range(1, len(s))
                    if self.pending.endswith(s[:k])], default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return self._send(out)

    def _check_stop_only(self) -> str:
        for stop in self.stops:
            if stop in self.pending:
                self.pending = self.pending[:self.pending.find(stop)]
                self.stopped = True
        return ""

    def flush(self) -> str:
        """At the end of the reply: whatever was waiting (not the held tool-call text)."""
        if self.stopped or self.holding:
            return ""
        out, self.pending = self.pending, ""
        return self._send(out)

    def _send(self, text: str) -> str:
        if text:
            self.sent.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.sent)


def require_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"the model {requested[:128]!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
