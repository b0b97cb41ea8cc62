"""What a generation stream yields, in order: Started, then TextDelta and AudioChunk as they are made, then Done
(or Failed). The typed contract between the engine and everything that shows a reply (the API, the server, the CLI).

    Started(prompt_tokens, cached_tokens)   the prompt is in: its size, and how much of it a cached conversation
                                            prefix spared (no prefill, no media encoding)
    TextDelta(text, token_ids, logprobs)    new text (never a broken UTF-8 character); with logprobs asked for,
                                            the TokenLogprob of every reply token since the last delta
    AudioChunk(audio, offset, sample_rate)  new speech: float32 mono samples starting at sample `offset`
    Done(result)                            the whole reply (GenerationResult)
    Failed(error)                           the stream ended without a reply: `error` is an errors.InputError for
                                            a problem with the request, anything else is an engine bug
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .processing.tools import ToolCall


@dataclass(frozen=True)
class TokenLogprob:
    """A reply token's log-probability under the thinker's raw distribution (before the repetition penalty, a
    grammar's mask, temperature, top-k and top-p), and the `top` most likely ids at that position with theirs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, taken from a cached conversation prefix

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # the reply's tokens, prompt excluded, stop token included when one was produced
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()  # parsed from <tool_call> blocks when tools were offered (text is the rest)
    audio: np.ndarray | None = None  # float32 mono waveform of the spoken reply, when audio was asked for
    sample_rate: int | None = None
    codes: torch.Tensor | None = None  # (groups, frames) the codec codes the talker produced
    speech_finish_reason: str | None = None  # "stop" (codec EOS), "length" (its budget or the runaway guard)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per reply token but a stop token, when asked for


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class AudioChunk:
    audio: np.ndarray  # float32 mono samples
    offset: int  # index of the chunk's first sample in the whole reply's waveform
    sample_rate: int


@dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Started | TextDelta | AudioChunk | Done | Failed
