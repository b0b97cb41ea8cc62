"""Running one chat request on the engine worker and turning its events into OpenAI replies (whole, or SSE chunks).

The worker hands over the stream's events (events.py): Started (the prompt's size: a reply cut at a stop string
never reaches Done), TextDelta, AudioChunk, then Done or Failed. A client that goes away cancels its job.

Log-probabilities (`logprobs: true`) are the thinker's raw ones (events.TokenLogprob), one entry per reply token but
the stop token, in OpenAI's shape; a streamed chunk carries those of the tokens its TextDelta brought (with the text
the stop-string gate let through, maybe none).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..events import AudioChunk, Done, Failed, GenerationResult, Started, TextDelta, TokenLogprob
from ..omni import Omni
from ..processing.tokenizer import Tokenizer
from . import audio_out
from .chat import TOOL_CALL_MARKER, StreamSettings, TextGate, openai_tool_calls
from .engine_worker import EngineWorker, Job, QueueFull, WorkerStopped
from .errors import APIError, ErrorBody, ErrorResponse, input_error
from .schemas import (ChatCompletion, Choice, ChoiceLogprobs, CompletionTokensDetails, ReplyAudio, ReplyMessage,
                      ServerLimits, TokenLogprobModel, TopLogprob, UsageModel)

AUDIO_EXPIRY_SECONDS = 3600
DISCONNECT_POLL_SECONDS = 0.5


async def submit(worker: EngineWorker, omni: Omni, messages: list, settings: StreamSettings,
                 limits: ServerLimits) -> Job:
    """The request typed, its prompt prepared (media decoded, tokens counted) off the event loop and off the
    engine's thread, then handed to the engine. Input errors surface here, before any reply."""
    try:
        request = settings.for_messages(messages)
        prompt = await run_in_threadpool(omni.prepare, request.messages, request.use_audio_in_video, request.tools,
                                         request.template)
    except InputError as error:
        raise failure(error) from None
    try:
        return worker.submit(request, prompt, asyncio.get_running_loop())
    except QueueFull:
        raise APIError(429, "the server is busy: too many requests are running or queued; retry shortly",
                       code="rate_limit_exceeded", headers={"Retry-After": str(limits.retry_after_seconds)}) from None
    except WorkerStopped:
        raise APIError(503, "the server is shutting down", code="server_shutting_down") from None


def failure(error: BaseException) -> APIError:
    """An engine event's failure as the client sees it: the request's own problem is a 400; a shutdown a 503;
    anything else (an engine bug, logged with its traceback where it happened) a 500."""
    if isinstance(error, InputError):
        return input_error(error)  # a 400 naming the field (param) and the kind (code)
    if isinstance(error, WorkerStopped):
        return APIError(503, "the server is shutting down", code="server_shutting_down")
    return APIError(500, "the engine failed while answering this request", code="internal_error")


async def job_events(job: Job, request: Request) -> AsyncIterator:
    """The job's events until it ends; Failed becomes an APIError. The client's connection is checked every
    DISCONNECT_POLL_SECONDS (events flowing or not): a client that went away cancels the job."""
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                item = None  # nothing yet: time to look at the connection
            if loop.time() - checked >= DISCONNECT_POLL_SECONDS:
                checked = loop.time()
                if await request.is_disconnected():
                    return
            if item is None:
                continue
            if isinstance(item, Failed):
                raise failure(item.error)
            yield item
            if isinstance(item, Done):
                return
    finally:
        job.cancel()


@dataclass
class Reply:
    """What the reply has produced so far."""

    settings: StreamSettings
    sample_rate: int
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    audio_id: str = field(default_factory=lambda: f"audio_{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))
    gate: TextGate = field(init=False)
    audio: list[np.ndarray] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    result: GenerationResult | None = None
    tokenizer: Tokenizer | None = None  # names the tokens of logprobs
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self):
        markers = (TOOL_CALL_MARKER,) if self.settings.tools_offered else ()
        self.gate = TextGate(self.settings.stops, markers)

    @property
    def finish_reason(self) -> str:
        if self.result is not None and self.result.tool_calls and not self.gate.stopped:
            return "tool_calls"
        if self.gate.stopped or self.result is None:
            return "stop"
        return self.result.finish_reason

    def usage(self) -> UsageModel:
        prompt = self.result.usage.prompt_tokens if self.result else self.prompt_tokens
        completion = self.result.usage.completion_tokens if self.result else self.completion_tokens
        frames = 0
        if self.result is not None and self.result.codes is not None:
            frames = int(self.result.codes.shape[1])
        details = CompletionTokensDetails(audio_tokens=frames, text_tokens=completion)
        return UsageModel(prompt_tokens=prompt, completion_tokens=completion + frames,
                          total_tokens=prompt + completion + frames, completion_tokens_details=details)

    def waveform(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)

    def choice_logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if not self.settings.logprobs:
            return None
        return ChoiceLogprobs(content=[self._entry(e) for e in entries])

    def tool_calls(self) -> list:
        calls = openai_tool_calls(self.result.tool_calls)
        return calls if self.settings.parallel_tool_calls else calls[:1]  # parallel_tool_calls: false

    def _entry(self, entry: TokenLogprob) -> TokenLogprobModel:
        top = []
        for token_id, logprob in entry.top:
            text, data = self._token(token_id)
            top.append(TopLogprob(token=text, logprob=logprob, bytes=data))
        text, data = self._token(entry.token_id)
        return TokenLogprobModel(token=text, logprob=entry.logprob, bytes=data, top_logprobs=top)

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text (invalid UTF-8 as U+FFFD) and bytes; ids past the tokenizer (vocabulary padding): none."""
        assert self.tokenizer is not None, "a reply with logprobs needs the tokenizer"
        if token_id >= self.tokenizer.vocab_size:
            return "", []
        data = self.tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)


def _count(reply: Reply, event) -> None:
    if isinstance(event, Started):
        reply.prompt_tokens = event.prompt_tokens
    elif isinstance(event, TextDelta):
        reply.completion_tokens += len(event.token_ids)
        reply.logprobs.extend(event.logprobs)
    elif isinstance(event, Done):
        reply.result = event.result


async def prefetched(events: AsyncIterator) -> AsyncIterator:
    """The same events, the first one awaited now (so that an input error is reported before any reply)."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return _replay([], events)
    return _replay([first], events)


async def _replay(head: list, events: AsyncIterator) -> AsyncIterator:
    for item in head:
        yield item
    async for item in events:
        yield item


async def complete(events: AsyncIterator, reply: Reply, served_name: str) -> ChatCompletion:
    async for event in events:
        _count(reply, event)
        if isinstance(event, TextDelta):
            reply.gate.push(event.text)
            if reply.gate.stopped:
                break
        elif isinstance(event, AudioChunk):
            reply.audio.append(event.audio)
    content = reply.gate.text + reply.gate.flush()
    tool_calls = None
    if reply.finish_reason == "tool_calls":
        content, tool_calls = reply.result.text or None, reply.tool_calls()
    elif reply.gate.holding:
        content = reply.result.text if reply.result else reply.gate.text + reply.gate.pending
    audio = None
    if reply.settings.want_audio:
        data = audio_out.encode(reply.waveform(), reply.sample_rate, reply.settings.audio_format)
        audio = ReplyAudio(id=reply.audio_id, data=base64.b64encode(data).decode(), transcript=content or "",
                           expires_at=reply.created + AUDIO_EXPIRY_SECONDS)
    message = ReplyMessage(content=content, audio=audio, tool_calls=tool_calls)
    choice = Choice(message=message, finish_reason=reply.finish_reason, logprobs=reply.choice_logprobs(reply.logprobs))
    return ChatCompletion(id=reply.id, created=reply.created, model=served_name, usage=reply.usage(),
                          choices=[choice])


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_chunks(events: AsyncIterator, reply: Reply, served_name: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """SSE lines: a role chunk, content and audio deltas as they come, the finish chunk, usage, [DONE]."""

    def chunk(delta: dict, finish: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        return _sse({"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                     "model": served_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                        "logprobs": logprobs and logprobs.model_dump()}]})

    yield chunk({"role": "assistant", "content": ""})
    wav_header = reply.settings.want_audio and reply.settings.audio_format == "wav"
    try:
        async for event in events:
            _count(reply, event)
            if isinstance(event, TextDelta):
                text = reply.gate.push(event.text)
                logprobs = reply.choice_logprobs(list(event.logprobs)) if event.logprobs else None
                if text or logprobs:
                    yield chunk({"content": text}, logprobs=logprobs)
                if reply.gate.stopped:
                    break
            elif isinstance(event, AudioChunk):
                data = audio_out.to_pcm16(event.audio)
                if wav_header:
                    data, wav_header = audio_out.streaming_wav_header(reply.sample_rate) + data, False
                reply.audio.append(event.audio)
                yield chunk({"audio": {"id": reply.audio_id, "data": base64.b64encode(data).decode()}})
    except APIError as error:
        yield _sse(ErrorResponse(error=ErrorBody(**error.body()["error"])).model_dump())
        return
    tail = reply.gate.flush()
    if tail:
        yield chunk({"content": tail})
    if reply.finish_reason == "tool_calls":
        calls = [dict(call.model_dump(), index=i) for i, call in enumerate(reply.tool_calls())]
        yield chunk({"tool_calls": calls})
    elif reply.gate.holding and reply.gate.pending:
        yield chunk({"content": reply.gate.pending})
    if reply.settings.want_audio:
        yield chunk({"audio": {"id": reply.audio_id, "expires_at": reply.created + AUDIO_EXPIRY_SECONDS,
                               "transcript": reply.gate.text}})
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield _sse({"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
                    "model": served_name, "choices": [], "usage": reply.usage().model_dump()})
    yield "data: [DONE]\n\n"
