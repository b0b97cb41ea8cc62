"""Between the public API and the scheduler: a GenerationRequest becomes a StreamSpec (resolved sampling and speech,
its detokenizer, how its result is assembled), and the keyword arguments `Omni.generate / stream` accept become a
GenerationRequest (the one place they are read).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from .config import OmniConfig
from .engine.constraints import build_constraint
from .engine.stream import Stream, StreamSpec
from .errors import RequestError
from .events import Done, Event, GenerationResult, Usage
from .processing.chat_template import TemplateOptions
from .processing.multimodal import PreparedPrompt
from .processing.tokenizer import IncrementalDetokenizer, Tokenizer
from .processing.tools import parse_tool_calls
from .requests import (FRAMES_PER_SECOND, GenerationRequest, ResponseFormat, SamplingParams, SpeechParams,
                       ToolChoice, resolve_sampling, resolve_speech)

SAMPLING_KEYWORDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                     "logprobs")
TALKER_KEYWORDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def request_from_keywords(messages, *, seed=None, stop_token_ids=None, use_audio_in_video=False, tools=None,
                          return_audio=None, voice=None, audio_chunk_frames=1, talker: dict | None = None,
                          response_format=None, tool_choice=None, enable_thinking: bool | None = None,
                          chat_template_kwargs: dict | None = None, speaks_by_default: bool = False,
                          **keywords) -> GenerationRequest:
    """The keyword form of Omni.generate / stream: thinker sampling by name, the talker's as talker_<name> or in the
    `talker` dict ({"do_sample": False, "max_new_tokens": 100}); talker max_new_tokens counts talker tokens
    (frames + 1), as the reference's talker_max_new_tokens does. `response_format`: a ResponseFormat or OpenAI's
    dict; `tool_choice`: a ToolChoice, "auto", "required", or a function's name. `enable_thinking` and
    `chat_template_kwargs` (other template variables): the chat template's options (TemplateOptions)."""
    talker = dict(talker or {})
    for name in TALKER_KEYWORDS:
        value = keywords.pop(f"talker_{name}", None)
        if value is not None:
            talker[name] = value
    unknown = sorted(set(keywords) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise RequestError(f"unknown option(s) {unknown}; sampling options: {list(SAMPLING_KEYWORDS)}")
    if unknown := sorted(set(talker) - set(TALKER_KEYWORDS)):
        raise RequestError(f"unknown talker sampling option(s) {unknown}; known: {sorted(TALKER_KEYWORDS)}")
    stops = None if stop_token_ids is None else tuple(stop_token_ids)
    sampling = SamplingParams(seed=seed, stop_token_ids=stops, **{k: v for k, v in keywords.items() if v is not None})
    speak = speaks_by_default if return_audio is None else return_audio
    speech = None
    if speak:
        budget = talker.pop("max_new_tokens", None)
        seconds = None if budget is None else _frames_to_seconds(budget)
        speech = SpeechParams(voice=voice, max_seconds=seconds, chunk_frames=audio_chunk_frames,
                              **{k: v for k, v in talker.items() if v is not None})
    template = TemplateOptions(enable_thinking, {} if chat_template_kwargs is None else chat_template_kwargs)
    return GenerationRequest(messages, sampling, speech, tools, use_audio_in_video,
                             _response_format(response_format), _tool_choice(tool_choice), template=template)


def _response_format(value) -> ResponseFormat | None:
    """A ResponseFormat, or OpenAI's {"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}} form."""
    if value is None or isinstance(value, ResponseFormat):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError(f"response_format must be a ResponseFormat or a dict with a type, got {value!r:.80}",
                           param="response_format")
    spec = value.get("json_schema") or {}
    if not isinstance(spec, dict):
        raise RequestError(f"response_format json_schema must be an object, got {spec!r:.80}",
                           param="response_format.json_schema")
    return ResponseFormat(value["type"], spec.get("schema"), spec.get("strict") is True)


def _tool_choice(value) -> ToolChoice | None:
    if value is None or isinstance(value, ToolChoice):
        return value
    if value in ("auto", "required"):
        return ToolChoice(value)
    if isinstance(value, str) and value:
        return ToolChoice(function=value)
    raise RequestError(f"tool_choice must be a ToolChoice, 'auto', 'required' or a function's name, got "
                       f"{value!r:.80}", param="tool_choice")


def _frames_to_seconds(talker_tokens) -> float:
    if isinstance(talker_tokens, bool) or not isinstance(talker_tokens, int) or talker_tokens < 1:
        raise RequestError(f"talker max_new_tokens must be an integer >= 1, got {talker_tokens!r}")
    return max(1, talker_tokens - 1) / FRAMES_PER_SECOND


def stream_spec(cfg: OmniConfig, tokenizer: Tokenizer, request: GenerationRequest, prompt: PreparedPrompt,
                has_talker: bool, default_voice: str, sink: Callable[[Event], None]) -> StreamSpec:
    sampling = resolve_sampling(cfg, request.sampling)
    stops = frozenset(request.sampling.stop_token_ids or cfg.stop_token_ids)
    speech = None
    if request.speech is not None:
        if not has_talker:
            reason = ("this checkpoint has no talker (a thinker-only model)" if not cfg.has_audio_output
                      else "it was loaded with audio_output=False")
            raise RequestError(f"audio output was requested but {reason}")
        speech = resolve_speech(cfg, request.speech, default_voice, request.sampling.seed)
    vocab = cfg.thinker.text.vocab_size
    constraint = build_constraint(tokenizer, vocab, stops, request.response_format, request.tools,
                                  request.tool_choice)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)

    def detokenize(token: int, final: bool) -> str:
        # Ids past the tokenizer (the model's vocabulary is padded) and stop ids carry no text.
        piece = "" if token in stops or token >= tokenizer.vocab_size else detok.push(token)
        return piece + detok.flush() if final else piece

    def finish(stream: Stream) -> Event:
        return Done(reply_result(tokenizer, stream, stops, bool(request.tools), cfg))

    return StreamSpec(prompt, sampling, request.sampling.seed, stops, speech, detokenize, finish, sink, constraint,
                      request.sampling.logprobs)


def reply_result(tokenizer: Tokenizer, stream: Stream, stops: frozenset[int], tools: bool,
                 cfg: OmniConfig) -> GenerationResult:
    reply = stream.thinker.tokens
    stopped = bool(reply) and reply[-1] in stops
    text_ids = [t for t in (reply[:-1] if stopped else reply) if t < tokenizer.vocab_size]
    result = GenerationResult(text=tokenizer.decode(text_ids, skip_special_tokens=True), token_ids=list(reply),
                              finish_reason="stop" if stopped else "length",
                              usage=Usage(stream.prompt_tokens, len(reply), stream.thinker.cached),
                              logprobs=tuple(stream.thinker.logprobs) if stream.spec.logprobs is not None else None)
    speech = stream.speech
    if speech is not None:
        audio = np.concatenate(speech.audio) if speech.audio else np.zeros(0, dtype=np.float32)
        codes = torch.stack(speech.codes, dim=1) if speech.codes else None
        result = dataclasses.replace(result, audio=audio, sample_rate=cfg.code2wav.sample_rate, codes=codes,
                                     speech_finish_reason=speech.finish_reason)
    if tools:
        text, calls = parse_tool_calls(result.text)
        result = dataclasses.replace(result, text=text, tool_calls=tuple(calls))
    return result
