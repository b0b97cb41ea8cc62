"""Every event the Realtime socket sends, checked against the `openai` package's own server-event models (GA
schema): a text turn, an audio turn with server VAD, a cancelled reply, barge-in, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import speech  # noqa: E402
from realtime_schema import validate  # noqa: E402
from thinktalk import Omni  # noqa: E402
from thinktalk.serve.realtime import realtime_router  # noqa: E402
from thinktalk.serve.realtime_events import float_to_pcm16  # noqa: E402

RATE = 24_000
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 100, "silence_duration_ms": 300}
SERVED = "served-omni"


class Socket:
    """A test client's socket that checks each server event as it arrives and keeps them all."""

    def __init__(self, ws):
        self.ws, self.events = ws, []

    def send(self, event: dict | str) -> None:
        self.ws.send_text(event if isinstance(event, str) else json.dumps(event))

    def next(self) -> dict:
        event = json.loads(self.ws.receive_text())
        validate(event)
        self.events.append(event)
        return event

    def until(self, kind: str, limit: int = 5000) -> list[dict]:
        start = len(self.events)
        for _ in range(limit):
            if self.next()["type"] == kind:
                return self.events[start:]
        raise AssertionError(f"no {kind} within {limit} events")

    def speak(self, audio: np.ndarray, chunk_ms: int = 100) -> None:
        step = RATE * chunk_ms // 1000
        for start in range(0, len(audio), step):
            self.send({"type": "input_audio_buffer.append", "audio": float_to_pcm16(audio[start:start + step])})

    def ask(self, text: str) -> None:
        self.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        self.send({"type": "response.create"})


@pytest.fixture(scope="module")
def client(tiny):
    torch.set_num_threads(1)
    omni = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")
    app = FastAPI()
    app.include_router(realtime_router(omni, defaults={"max_output_tokens": 5, "talker_max_new_tokens": 5,
                                                       "seed": 0, "audio_chunk_frames": 2}, model_name=SERVED))
    with TestClient(app) as client:
        yield client


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def test_the_validator_refuses_what_the_socket_used_to_send():
    event = {"type": "response.content_part.added", "event_id": "e", "response_id": "r", "item_id": "i",
             "output_index": 0, "content_index": 0, "part": {"type": "output_audio", "transcript": ""}}
    with pytest.raises(ValidationError):
        validate(event)
    validate({**event, "part": {"type": "audio", "transcript": ""}})
    with pytest.raises(AssertionError):
        validate({"type": "response.no_such_event"})


def test_text_and_audio_turns_validate_and_name_the_served_model(client):
    with client.websocket_connect("/v1/realtime") as raw:
        ws = Socket(raw)
        assert ws.next()["session"]["model"] == SERVED
        ws.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
        assert ws.until("session.updated")[-1]["session"]["model"] == SERVED
        ws.ask("Hello!")
        text = ws.until("response.done")
        assert [e["part"]["type"] for e in of(text, "response.content_part.added")] == ["text"]
        assert [e["part"]["type"] for e in of(text, "response.content_part.done")] == ["text"]
        assert text[-1]["response"]["output"][0]["content"][0]["type"] == "output_text"
        assert of(text, "response.output_text.done")

        ws.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"],
                                                       "audio": {"input": {"turn_detection": VAD}}}})
        ws.until("session.updated")
        ws.speak(speech.spoken_turn(0))
        audio = ws.until("response.done")
        for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.created", "response.output_audio.delta",
                     "response.output_audio_transcript.done", "response.output_audio.done"):
            assert of(audio, kind), kind
        assert [e["part"]["type"] for e in of(audio, "response.content_part.added")] == ["audio"]
        done_part = of(audio, "response.content_part.done")[0]["part"]
        assert done_part["type"] == "audio" and done_part["transcript"] == of(
            audio, "response.output_audio_transcript.done")[0]["transcript"]
        assert audio[-1]["response"]["output"][0]["content"][0]["type"] == "output_audio"
        assert audio[-1]["response"]["status"] == "completed"


def test_cancel_barge_in_clear_delete_and_errors_validate(client):
    with client.websocket_connect("/v1/realtime") as raw:
        ws = Socket(raw)
        ws.next()
        ws.send({"type": "session.update", "session": {"turn_detection": None, "max_output_tokens": 300,
                                                       "talker_max_new_tokens": 300}})
        ws.until("session.updated")
        ws.ask("Talk.")
        ws.until("response.created")
        ws.send({"type": "response.cancel"})
        cancelled = ws.until("response.done")[-1]["response"]
        assert cancelled["status"] == "cancelled" and cancelled["status_details"]["reason"] == "client_cancelled"

        ws.send({"type": "session.update", "session": {"turn_detection": VAD}})
        ws.until("session.updated")
        ws.speak(speech.spoken_turn(0))
        ws.until("response.created")
        ws.speak(speech.spoken_turn(1, lead=0.0, tail=0.0))  # spoken over the reply: barge-in
        interrupted = ws.until("response.done")[-1]["response"]
        assert interrupted["status_details"]["reason"] == "turn_detected"
        ws.send({"type": "session.update", "session": {"turn_detection": None, "max_output_tokens": 3}})
        ws.until("session.updated")

        ws.speak(np.zeros(RATE // 2, np.float32))
        ws.send({"type": "input_audio_buffer.clear"})
        ws.until("input_audio_buffer.cleared")
        ws.send({"type": "conversation.item.create", "item": {
            "id": "gone", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bye."}]}})
        ws.until("conversation.item.created")
        ws.send({"type": "conversation.item.delete", "item_id": "gone"})
        ws.until("conversation.item.deleted")

        bad = ["{not json", json.dumps([1]), json.dumps({"type": "no.such.event", "event_id": "x1"}),
               json.dumps({"type": "input_audio_buffer.commit"}), json.dumps({"type": "response.cancel"}),
               json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}),
               json.dumps({"type": "session.update", "session": {"voice": "nobody"}}),
               json.dumps({"type": "conversation.item.delete", "item_id": "gone"})]
        for text in bad:
            ws.send(text)
            assert ws.next()["type"] == "error", text
        raw.send_bytes(b"\x00")
        assert ws.next()["type"] == "error"
        ws.ask("Hi")
        ws.send({"type": "response.create", "event_id": "x7"})  # one reply at a time
        last = ws.until("response.done")
        assert [e["error"]["event_id"] for e in of(last, "error")] == ["x7"]
    kinds = {e["type"] for e in ws.events}
    assert {"error", "response.done", "input_audio_buffer.speech_started", "conversation.item.deleted"} <= kinds
