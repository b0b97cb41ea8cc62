"""The Realtime protocol's typed events (see realtime.py): the client events, parsed and checked by pydantic, the
session's settings and its `session` object, the server events, and the wire audio (base64 PCM16 mono at 24 kHz)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_RATE = 24_000  # PCM16 mono on the socket, both ways


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
    model: str = ""  # the served model name (session.model)
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
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
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


def pcm16_to_float(data: str) -> np.ndarray:
    raw = base64.b64decode(data, validate=True)
    if len(raw) % 2:
        raise ValueError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")

