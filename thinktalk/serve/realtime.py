"""`WS /v1/realtime`: OpenAI's Realtime protocol (GA event names) over one Omni model.

    client: session.update, input_audio_buffer.append/commit/clear, conversation.item.create/delete,
            response.create/cancel
    server: session.created/updated, input_audio_buffer.speech_started/speech_stopped/committed/cleared,
            conversation.item.created/deleted, response.created, response.output_item.added/done,
            response.content_part.added/done, response.output_text.delta/done, response.output_audio.delta/done,
            response.output_audio_transcript.delta/done, response.done, error (naming the offending event)

Audio in and out is base64 PCM16 mono at 24 kHz; input audio is resampled to the model's 16 kHz. With `server_vad`
turn detection (see vad.py) a stop in speech commits the turn and starts a reply; speech during a reply cancels it
(barge-in). The conversation (user items, assistant replies as text) lives as long as the socket. Generation runs
off the event loop through a `StreamRunner` (default: a thread per reply, one reply at a time per model), checked
for cancellation between events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union

import numpy as np
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..engine.pipeline import AudioChunk, TextDelta
from ..omni import Done
from ..processing.audio import resample
from .vad import InputBuffer, TurnStarted, VadSettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
WIRE_RATE = 24_000  # PCM16 mono on the socket, both ways
MIN_COMMIT_MS = 100
KEY_PROTOCOL = "openai-insecure-api-key."


# ---------------------------------------------------------------------------------------------------- event models


class TurnDetection(BaseModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    silence_duration_ms: int = Field(500, ge=0, le=10_000)
    create_response: bool = True
    interrupt_response: bool = True


class AudioIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    turn_detection: TurnDetection | None = None


class AudioOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    voice: str | None = None


class AudioSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: AudioIn | None = None
    output: AudioOut | None = None


class SessionPatch(BaseModel):
    """session.update's `session`: the GA layout (audio.input.turn_detection, audio.output.voice) or the flat one.
    thinktalk's own options: talker_max_new_tokens (the speech budget in codec frames), seed, audio_chunk_frames."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["realtime"] | None = None
    instructions: str | None = None
    voice: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1, max_length=2)
    turn_detection: TurnDetection | None = None
    audio: AudioSettings | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None  # "inf": 4096
    talker_max_new_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    audio_chunk_frames: int | None = Field(None, ge=1, le=100)


class SessionState(BaseModel):
    id: str = ""
    instructions: str = ""
    voice: str = ""
    output_modalities: list[Literal["text", "audio"]] = ["audio"]
    turn_detection: TurnDetection | None = TurnDetection()
    max_output_tokens: int = Field(256, ge=1)
    talker_max_new_tokens: int | None = None
    seed: int | None = None
    audio_chunk_frames: int = 4

    def apply(self, patch: SessionPatch, voices: list[str]) -> "SessionState":
        update: dict[str, Any] = {k: getattr(patch, k) for k in patch.model_fields_set if k in (
            "instructions", "output_modalities", "talker_max_new_tokens", "seed", "audio_chunk_frames")}
        voice = patch.voice or (patch.audio.output.voice if patch.audio and patch.audio.output else None)
        if voice is not None:
            if voice.lower() not in voices:
                raise ValueError(f"unknown voice {voice!r}; this model has {', '.join(voices) or 'no voices'}")
            update["voice"] = voice.lower()
        if "turn_detection" in patch.model_fields_set:
            update["turn_detection"] = patch.turn_detection
        if patch.audio and patch.audio.input and "turn_detection" in patch.audio.input.model_fields_set:
            update["turn_detection"] = patch.audio.input.turn_detection
        if "max_output_tokens" in patch.model_fields_set and patch.max_output_tokens is not None:
            tokens = patch.max_output_tokens
            update["max_output_tokens"] = 4096 if tokens == "inf" else tokens
        return self.model_copy(update=update)

    def public(self) -> dict:
        """The session as OpenAI's GA `session` object (plus thinktalk's own fields)."""
        pcm = {"type": "audio/pcm", "rate": WIRE_RATE}
        td = None if self.turn_detection is None else self.turn_detection.model_dump()
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": "qwen3-omni",
                "instructions": self.instructions, "output_modalities": self.output_modalities,
                "max_output_tokens": self.max_output_tokens,
                "audio": {"input": {"format": pcm, "turn_detection": td},
                          "output": {"format": pcm, "voice": self.voice}},
                "talker_max_new_tokens": self.talker_max_new_tokens, "seed": self.seed,
                "audio_chunk_frames": self.audio_chunk_frames}


class ContentPart(BaseModel):
    type: Literal["input_text", "input_audio", "input_image", "text", "output_text"]
    text: str | None = None
    audio: str | None = None  # base64 PCM16 mono 24 kHz (input_audio)
    image_url: str | None = None  # a data URL (input_image)
    transcript: str | None = None


class MessageItem(BaseModel):
    id: str | None = None
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart] = Field(min_length=1)


class ClientEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: str | None = None


class SessionUpdate(ClientEvent):
    type: Literal["session.update"]
    session: SessionPatch


class InputAudioAppend(ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioCommit(ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioClear(ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ConversationItemCreate(ClientEvent):
    type: Literal["conversation.item.create"]
    item: MessageItem
    previous_item_id: str | None = None


class ConversationItemDelete(ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)


class ResponseCreate(ClientEvent):
    type: Literal["response.create"]
    response: ResponseOptions | None = None


class ResponseCancel(ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


_CLIENT_EVENTS = TypeAdapter(Annotated[Union[SessionUpdate, InputAudioAppend, InputAudioCommit, InputAudioClear,
                                             ConversationItemCreate, ConversationItemDelete, ResponseCreate,
                                             ResponseCancel],
                                       Field(discriminator="type")])


def parse_client_event(raw: dict) -> ClientEvent:
    return _CLIENT_EVENTS.validate_python(raw)


class ServerEvent(BaseModel):
    """A server event: `type` plus its fields (the payloads follow OpenAI's GA Realtime reference)."""

    model_config = ConfigDict(extra="allow")
    type: str

    @classmethod
    def of(cls, type: str, **fields: Any) -> "ServerEvent":
        return cls(type=type, **fields)


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: dict

    @classmethod
    def make(cls, message: str, code: str, event_type: str | None, event_id: str | None,
             param: str | None) -> "ErrorEvent":
        kind = "invalid_request_error" if code != "generation_failed" else "server_error"
        return cls(error={"type": kind, "code": code, "message": message, "param": param,
                          "event_id": event_id, "event_type": event_type})


class Cancel:
    """A reply's stop signal: set on the event loop, read by the engine's thread and awaited by the reply."""

    def __init__(self) -> None:
        self._flag, self._event = threading.Event(), asyncio.Event()

    def set(self) -> None:
        self._flag.set()
        self._event.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> None:
        await self._event.wait()


async def next_or_cancel(queue: asyncio.Queue, cancel: Cancel) -> tuple[bool, object]:
    """(True, item) for the queue's next item, (False, None) as soon as `cancel` is set."""
    if cancel.is_set():
        return False, None
    getter, waiter = asyncio.ensure_future(queue.get()), asyncio.ensure_future(cancel.wait())
    done, pending = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if getter in done and not cancel.is_set():
        return True, getter.result()
    return False, None


class StreamRunner(Protocol):
    """Runs a blocking `Omni.stream` iterator off the event loop. `start()` creates it on the engine's thread; its
    events come back in order; once `cancel` is set, iteration ends at once and the iterator is closed there."""

    def stream(self, start: Callable[[], Iterator], cancel: Cancel) -> AsyncIterator: ...


class ThreadStreamRunner:
    """One thread per reply; a lock keeps the model to one reply at a time (the others wait their turn)."""

    def __init__(self) -> None:
        self._model_lock = threading.Lock()

    async def stream(self, start: Callable[[], Iterator], cancel: Cancel) -> AsyncIterator:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        end = object()

        def deliver(item: object) -> None:
            if not loop.is_closed():  # a cancelled reply's thread may outlive the session's loop
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            outcome: object = end
            with self._model_lock:
                try:
                    if not cancel.is_set():
                        events = start()
                        try:
                            for event in events:
                                if cancel.is_set():
                                    break
                                deliver(event)
                        finally:
                            events.close()
                except Exception as exc:  # handed to the awaiting coroutine, which raises it
                    outcome = exc
            deliver(outcome)

        threading.Thread(target=work, name="realtime-reply", daemon=True).start()
        ended = False
        try:
            while True:
                more, item = await next_or_cancel(queue, cancel)
                if not more or item is end:
                    ended = True
                    return
                if isinstance(item, Exception):
                    ended = True
                    raise item
                yield item
        finally:
            if not ended:  # the consumer left early (its socket is gone): the thread stops at its next event
                cancel.set()


class WorkerStreamRunner:
    """Replies on the HTTP server's engine worker (engine_worker.EngineWorker), interleaved with its requests."""

    def __init__(self, worker) -> None:
        from .engine_worker import Failed, Finished, QueueFull, WorkerStopped

        self.worker = worker
        self._failed, self._finished, self._refusals = Failed, Finished, (QueueFull, WorkerStopped)

    async def stream(self, start: Callable[[], Iterator], cancel: Cancel) -> AsyncIterator:
        try:
            job = self.worker.submit(start, asyncio.get_running_loop())
        except self._refusals as exc:
            raise RuntimeError(f"the engine cannot take this reply now: {exc}") from exc
        try:
            while True:
                more, item = await next_or_cancel(job.events, cancel)
                if not more or isinstance(item, self._finished):
                    return
                if isinstance(item, self._failed):
                    raise item.error
                yield item
        finally:
            job.cancel()  # a no-op once finished; otherwise the worker closes the generator at its next turn


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def pcm16_to_float(data: str) -> np.ndarray:
    raw = base64.b64decode(data, validate=True)
    if len(raw) % 2:
        raise ValueError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


class EventError(ValueError):
    """A well-formed client event that cannot be done now; answered with an `error` event carrying `code`."""

    def __init__(self, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.code = code


class SocketGone(Exception):
    """The client went away (closed or half-open socket); the session stops."""


class RealtimeSession:
    def __init__(self, websocket: WebSocket, omni, runner: StreamRunner, defaults: SessionState):
        self.ws, self.omni, self.runner = websocket, omni, runner
        self.state = defaults.model_copy(update={"id": new_id("sess")})
        self.items: list[dict] = []  # conversation items as the client sees them (OpenAI format)
        self.messages: list[dict] = []  # the same, as Omni messages
        self.input = InputBuffer(WIRE_RATE)  # uncommitted input audio, and server VAD's turns
        self.turn_item = new_id("item")  # the id the next committed audio item gets
        self.reply: asyncio.Task | None = None
        self.cancel = Cancel()
        self.cancel_reason = "client_cancelled"
        self.send_lock = asyncio.Lock()
        self.open = True
        self._configure_vad()

    # -------------------------------------------------------------------------------------------------- plumbing

    async def send(self, event: ServerEvent) -> None:
        if not self.open:
            raise SocketGone()
        payload = event.model_dump(mode="json", exclude_none=False)
        payload["event_id"] = new_id("event")
        async with self.send_lock:
            try:
                await self.ws.send_text(json.dumps(payload))
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                self.open = False
                raise SocketGone() from exc

    async def error(self, message: str, code: str, event: dict | None = None, param: str | None = None) -> None:
        event = event or {}
        await self.send(ErrorEvent.make(message, code, event.get("type"), event.get("event_id"), param))

    async def run(self) -> None:
        await self.send(ServerEvent.of("session.created", session=self.state.public()))
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is None:
                    await self.error("binary frames are not part of the protocol: send JSON text",
                                     "invalid_request_error")
                    continue
                await self.handle(message["text"])
        except SocketGone:
            return
        finally:
            self.open = False
            await self.stop_reply()

    async def handle(self, text: str) -> None:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            await self.error(f"the message is not JSON: {exc}", "invalid_json")
            return
        if not isinstance(raw, dict):
            await self.error("an event must be a JSON object", "invalid_request_error")
            return
        try:
            event = parse_client_event(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            await self.error(f"invalid {raw.get('type')!r} event: {param}: {first['msg']}",
                             "invalid_request_error", raw, param)
            return
        try:
            await self.dispatch(event)
        except EventError as exc:
            await self.error(str(exc), exc.code, raw)
        except ValueError as exc:  # bad audio, media or settings in a well-formed event: the client is told, we go on
            await self.error(str(exc), "invalid_request_error", raw)

    async def dispatch(self, event: ClientEvent) -> None:
        if isinstance(event, SessionUpdate):
            self.state = self.state.apply(event.session, self.omni.voices)
            self._configure_vad()
            await self.send(ServerEvent.of("session.updated", session=self.state.public()))
        elif isinstance(event, InputAudioAppend):
            await self.append_audio(event.audio)
        elif isinstance(event, InputAudioCommit):
            if len(self.input.audio) < WIRE_RATE * MIN_COMMIT_MS // 1000:
                raise EventError(f"the input audio buffer holds {self.input.ms(len(self.input.audio))} ms; "
                                 f"at least {MIN_COMMIT_MS} ms are needed to commit", "input_audio_buffer_commit_empty")
            await self.commit(self.input.take())
        elif isinstance(event, InputAudioClear):
            self.input.take()
            await self.send(ServerEvent.of("input_audio_buffer.cleared"))
        elif isinstance(event, ConversationItemCreate):
            await self.add_item(event.item, event.previous_item_id)
        elif isinstance(event, ConversationItemDelete):
            at = next((i for i, item in enumerate(self.items) if item["id"] == event.item_id), None)
            if at is None:
                raise EventError(f"item {event.item_id!r} is not in the conversation", "item_not_found")
            del self.items[at], self.messages[at]
            await self.send(ServerEvent.of("conversation.item.deleted", item_id=event.item_id))
        elif isinstance(event, ResponseCreate):
            if self.reply is not None and not self.reply.done():
                raise EventError("the conversation already has an active response: cancel it or wait for "
                                 "response.done", "conversation_already_has_active_response")
            await self.start_reply(event.response.max_output_tokens if event.response else None,
                                   event.response.instructions if event.response else None)
        elif isinstance(event, ResponseCancel):
            if self.reply is None or self.reply.done():
                raise EventError("there is no active response to cancel", "response_cancel_not_active")
            await self.stop_reply()

    # ------------------------------------------------------------------------------------------------ input audio

    def _configure_vad(self) -> None:
        td = self.state.turn_detection
        self.input.detect(None if td is None else VadSettings(td.threshold, td.prefix_padding_ms,
                                                              td.silence_duration_ms))

    async def append_audio(self, data: str) -> None:
        try:
            samples = pcm16_to_float(data)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"audio is not base64 PCM16: {exc}") from exc
        for turn in self.input.append(samples):
            td = self.state.turn_detection
            if isinstance(turn, TurnStarted):
                await self.send(ServerEvent.of("input_audio_buffer.speech_started", audio_start_ms=turn.ms,
                                               item_id=self.turn_item))
                if td is not None and td.interrupt_response and self.reply is not None and not self.reply.done():
                    await self.stop_reply("turn_detected")
                continue
            await self.send(ServerEvent.of("input_audio_buffer.speech_stopped", audio_end_ms=turn.ms,
                                           item_id=self.turn_item))
            if turn.audio.size == 0:  # the turn's audio was already committed or cleared by the client
                continue
            await self.commit(turn.audio)
            if td is not None and td.create_response:
                await self.stop_reply("turn_detected")
                await self.start_reply(None, None)

    async def commit(self, audio: np.ndarray) -> None:
        item = MessageItem(id=self.turn_item, role="user", content=[{"type": "input_audio", "transcript": None}])
        self.turn_item = new_id("item")
        await self.send(ServerEvent.of("input_audio_buffer.committed", item_id=item.id,
                                       previous_item_id=self.items[-1]["id"] if self.items else None))
        rate = self.omni.media.audio.sampling_rate
        await self._remember(item, {"role": "user", "content": [
            {"type": "audio", "audio": (resample(audio, WIRE_RATE, rate), rate)}]})

    # ---------------------------------------------------------------------------------------------- conversation

    async def add_item(self, item: MessageItem, previous_item_id: str | None) -> None:
        """Appends the item, or inserts it after `previous_item_id` ("root": at the start)."""
        ids = [i["id"] for i in self.items]
        if previous_item_id not in (None, "root") and previous_item_id not in ids:
            raise ValueError(f"previous_item_id {previous_item_id!r} is not in the conversation")
        if item.id is not None and item.id in ids:
            raise ValueError(f"item id {item.id!r} is already in the conversation")
        at = len(ids) if previous_item_id is None else 0 if previous_item_id == "root" else ids.index(
            previous_item_id) + 1
        item = item.model_copy(update={"id": item.id or new_id("item")})
        parts: list[dict] = []
        for index, part in enumerate(item.content):
            field = {"input_audio": "audio", "input_image": "image_url"}.get(part.type, "text")
            if getattr(part, field) is None:
                raise ValueError(f"item.content[{index}]: a {part.type!r} part needs {field!r}")
            if part.type == "input_audio":
                rate = self.omni.media.audio.sampling_rate
                parts.append({"type": "audio", "audio": (resample(pcm16_to_float(part.audio), WIRE_RATE, rate), rate)})
            elif part.type == "input_image":
                parts.append({"type": "image", "image": part.image_url})
            else:
                parts.append({"type": "text", "text": part.text})
        message = {"role": item.role, "content": parts}
        # The media are decoded now, off the event loop, so a bad image or clip is refused here and never poisons
        # the conversation's later turns.
        await asyncio.to_thread(self.omni.prepare, [message])
        public = item.model_copy(update={"content": [p.model_copy(update={"audio": None}) for p in item.content]})
        await self._remember(public, message, at)

    async def _remember(self, item: MessageItem, message: dict, at: int | None = None) -> None:
        at = len(self.items) if at is None else at
        previous = self.items[at - 1]["id"] if at > 0 else None
        self.items.insert(at, item.model_dump(mode="json", exclude_none=True))
        self.messages.insert(at, message)
        await self.send(ServerEvent.of("conversation.item.created", previous_item_id=previous, item=self.items[at]))

    def prompt(self, instructions: str | None) -> list[dict]:
        system = instructions if instructions is not None else self.state.instructions
        return ([{"role": "system", "content": system}] if system else []) + self.messages

    # -------------------------------------------------------------------------------------------------- replies

    async def start_reply(self, max_tokens: int | None, instructions: str | None) -> None:
        self.cancel = Cancel()
        self.reply = asyncio.create_task(self._reply(self.cancel, max_tokens, instructions))

    async def stop_reply(self, reason: str = "client_cancelled") -> None:
        """Cancel the active reply (if any) and wait until its response.done went out."""
        if self.reply is None:
            return
        if not self.reply.done():
            self.cancel_reason = reason
        self.cancel.set()
        reply, self.reply = self.reply, None
        await asyncio.wait([reply])
        if not reply.cancelled() and (exc := reply.exception()) is not None and not isinstance(exc, SocketGone):
            log.error("realtime reply failed", exc_info=exc)

    async def _reply(self, cancel: Cancel, max_tokens: int | None, instructions: str | None) -> None:
        response_id, item_id = new_id("resp"), new_id("item")
        speak = "audio" in self.state.output_modalities and bool(self.omni.voices)
        part_type, text_field = ("output_audio", "transcript") if speak else ("output_text", "text")
        response = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": [],
                    "output_modalities": ["audio"] if speak else ["text"], "usage": None}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        await self.send(ServerEvent.of("response.created", response=response))
        await self.send(ServerEvent.of("response.output_item.added", response_id=response_id, output_index=0,
                                       item=item))
        await self.send(ServerEvent.of("response.content_part.added", part={"type": part_type, text_field: ""},
                                       **where))
        options = dict(return_audio=speak, max_new_tokens=max_tokens or self.state.max_output_tokens,
                       seed=self.state.seed, audio_chunk_frames=self.state.audio_chunk_frames)
        if speak:
            options.update(voice=self.state.voice, talker={"max_new_tokens": self.state.talker_max_new_tokens})
        messages = self.prompt(instructions)
        text, status, usage, failure = [], "completed", None, None
        text_kind = "response.output_audio_transcript" if speak else "response.output_text"
        try:
            async with contextlib.aclosing(self.runner.stream(lambda: self.omni.stream(messages, **options),
                                                              cancel)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                        await self.send(ServerEvent.of(text_kind + ".delta", delta=event.text, **where))
                    elif isinstance(event, AudioChunk) and event.audio.size:
                        audio = event.audio if event.sample_rate == WIRE_RATE else resample(
                            event.audio, event.sample_rate, WIRE_RATE)
                        await self.send(ServerEvent.of("response.output_audio.delta", delta=float_to_pcm16(audio),
                                                       **where))
                    elif isinstance(event, Done):
                        usage = event.result.usage
        except SocketGone:
            raise
        except (ValueError, FileNotFoundError) as exc:  # bad input found by the model's side: the client's problem
            status, failure = "failed", exc
            log.warning("realtime reply %s failed: %s", response_id, exc)
        except Exception as exc:  # a server-side failure: logged with its traceback and reported to the client
            status, failure = "failed", exc
            log.exception("realtime reply %s failed", response_id)
        if cancel.is_set() and status == "completed":
            status = "cancelled"
        reply_text = "".join(text)
        content = {"type": part_type, text_field: reply_text}
        item.update(status="completed" if status == "completed" else "incomplete", content=[content])
        if reply_text:
            self.items.append(item)
            self.messages.append({"role": "assistant", "content": reply_text})
        if not self.open:
            return
        if failure is not None:
            await self.error(f"generation failed: {failure}", "generation_failed")
        if speak:
            await self.send(ServerEvent.of("response.output_audio.done", **where))
        await self.send(ServerEvent.of(text_kind + ".done", **{text_field: reply_text}, **where))
        await self.send(ServerEvent.of("response.content_part.done", part=content, **where))
        await self.send(ServerEvent.of("response.output_item.done", response_id=response_id, output_index=0,
                                       item=item))
        reason = self.cancel_reason if status == "cancelled" else None
        response.update(status=status, output=[item], status_details={"type": status, "reason": reason})
        if usage is not None:
            response["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                                 "total_tokens": usage.total_tokens}
        await self.send(ServerEvent.of("response.done", response=response))


def _authorized(websocket: WebSocket, offered: list[str], api_key: str) -> bool:
    """`Authorization: Bearer KEY`, or (browsers cannot set headers) the subprotocol `openai-insecure-api-key.KEY`."""
    header = websocket.headers.get("authorization", "")
    given = [header[7:].strip()] if header[:7].lower() == "bearer " else []
    given += [p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)]
    return any(hmac.compare_digest(key.encode("utf-8", "replace"), api_key.encode("utf-8")) for key in given)


def realtime_router(omni, runner: StreamRunner | None = None, defaults: dict[str, Any] | None = None,
                    api_key: str | None = None) -> APIRouter:
    """`WS /v1/realtime` and `GET /v1/realtime/voices` over `omni`. `runner` runs replies off the event loop (the
    HTTP server's worker through WorkerStreamRunner, or by default a thread per reply); `defaults` seed every
    session (SessionState fields, e.g. {"max_output_tokens": 64, "talker_max_new_tokens": 24}); with `api_key` the
    socket is refused (close code 1008) without it."""
    runner = runner or ThreadStreamRunner()
    base = SessionState(voice=omni.default_voice if omni.voices else "", **(defaults or {}))
    router = APIRouter()

    @router.get("/v1/realtime/voices")
    def voices() -> dict:
        return {"voices": omni.voices, "default": base.voice or None}

    @router.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if api_key is not None and not _authorized(websocket, offered, api_key):
            await websocket.close(code=1008, reason="missing or invalid API key")
            return
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        await RealtimeSession(websocket, omni, runner, base).run()

    return router


def static_router() -> APIRouter:
    """The web page: `GET /` and its two assets under `/static/` (only the files the page is made of)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type=PAGE_FILES["index.html"])

    @router.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    return router
