"""One `WS /v1/realtime` socket's session (see realtime.py): its settings, input audio and server VAD, the
conversation, and its replies, each streamed from the model through a `StreamRunner` and cancellable."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ..errors import InputError, RequestError
from ..events import AudioChunk, Done, TextDelta
from ..processing.audio import resample
from ..requests import GenerationRequest
from .realtime_events import (
    WIRE_RATE, ClientEvent, ConversationItemCreate, ConversationItemDelete, ErrorEvent, InputAudioAppend,
    InputAudioClear, InputAudioCommit, MessageItem, ResponseCancel, ResponseCreate, ServerEvent, SessionState,
    SessionUpdate, float_to_pcm16, parse_client_event, pcm16_to_float)
from .vad import InputBuffer, TurnStarted, VadSettings

log = logging.getLogger("thinktalk.serve.realtime")  # the name it had before the module was split
MIN_COMMIT_MS = 100


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


class StreamRunner(Protocol):
    """Runs one reply off the event loop: its events come back in order; once `cancel` is set, iteration ends at
    once and the reply's work stops (its rows and caches freed)."""

    def stream(self, request: GenerationRequest, cancel: Cancel) -> AsyncIterator: ...


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class EventError(RequestError):
    """A well-formed client event that cannot be done now; answered with an `error` event carrying `code`."""

    def __init__(self, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.code = code


class SocketGone(Exception):
    """The client went away (closed or half-open socket); the session stops."""


class RealtimeSession:
    def __init__(self, websocket: WebSocket, omni, runner: StreamRunner, defaults: SessionState,
                 detector: str = "silero"):
        self.ws, self.omni, self.runner = websocket, omni, runner
        self.state = defaults.model_copy(update={"id": new_id("sess")})
        self.items: list[dict] = []  # conversation items as the client sees them (OpenAI format)
        self.messages: list[dict] = []  # the same, as Omni messages
        self.input = InputBuffer(WIRE_RATE, detector)  # uncommitted input audio, and server VAD's turns
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
        # GA schema: the item's content says output_audio / output_text, a content part event's `part` audio / text
        item_type, part_type, text_field = (("output_audio", "audio", "transcript") if speak
                                            else ("output_text", "text", "text"))
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
            request = self.omni.request(messages, **options)
            async with contextlib.aclosing(self.runner.stream(request, cancel)) as events:
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
        except InputError as exc:  # bad input found by the model's side: the client's problem
            status, failure = "failed", exc
            log.warning("realtime reply %s failed: %s", response_id, exc)
        except Exception as exc:  # a server-side failure: logged with its traceback and reported to the client
            status, failure = "failed", exc
            log.exception("realtime reply %s failed", response_id)
        if cancel.is_set() and status == "completed":
            status = "cancelled"
        reply_text = "".join(text)
        content = {"type": item_type, text_field: reply_text}
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
        await self.send(ServerEvent.of("response.content_part.done", part={"type": part_type, text_field: reply_text},
                                       **where))
        await self.send(ServerEvent.of("response.output_item.done", response_id=response_id, output_index=0,
                                       item=item))
        reason = self.cancel_reason if status == "cancelled" else None
        response.update(status=status, output=[item], status_details={"type": status, "reason": reason})
        if usage is not None:
            response["usage"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                                 "total_tokens": usage.total_tokens}
        await self.send(ServerEvent.of("response.done", response=response))
