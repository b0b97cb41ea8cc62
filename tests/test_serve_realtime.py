"""The Realtime socket on the tiny checkpoint: voice turns with server VAD, barge-in, bad events, vanished clients."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import speech  # noqa: E402
from realtime_schema import validate  # noqa: E402
from thinktalk import Omni  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from thinktalk.serve.realtime import WorkerStreamRunner, realtime_router  # noqa: E402
from thinktalk.serve.realtime_events import float_to_pcm16  # noqa: E402
from thinktalk.serve.vad import (EnergyVad, InputBuffer, SpeechStarted, SpeechStopped, TurnEnded,  # noqa: E402
                                  TurnStarted, VadSettings)

RATE = 24_000
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 100, "silence_duration_ms": 200}


def tone_turn(seconds: float = 0.6, hz: float = 440.0, lead: float = 0.2, tail: float = 0.5) -> np.ndarray:
    """Silence, a tone (a stand-in for speech), silence: float32 at 24 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = (0.3 * np.sin(2 * np.pi * hz * t) * np.sin(np.pi * t / seconds)).astype(np.float32)
    return np.concatenate([np.zeros(int(lead * RATE), np.float32), voiced, np.zeros(int(tail * RATE), np.float32)])


def send_audio(ws, audio: np.ndarray, chunk_ms: int = 100) -> None:
    step = RATE * chunk_ms // 1000
    for start in range(0, len(audio), step):
        chunk = float_to_pcm16(audio[start:start + step])
        ws.send_text(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))


def receive_until(ws, done: str, limit: int = 5000) -> list[dict]:
    """The server's events up to the first `done`, each checked against the openai package's models."""
    events = []
    for _ in range(limit):
        events.append(json.loads(ws.receive_text()))
        validate(events[-1])
        if events[-1]["type"] == done:
            return events
    raise AssertionError(f"no {done} within {limit} events")


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


@pytest.fixture(scope="module")
def omni(tiny):
    torch.set_num_threads(1)
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def app(omni):
    app = FastAPI()
    app.include_router(realtime_router(omni, defaults={"max_output_tokens": 6, "talker_max_new_tokens": 6,
                                                       "seed": 0, "audio_chunk_frames": 2}))
    return app


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def test_energy_vad_finds_the_tone_with_its_edges():
    vad = EnergyVad(VadSettings(0.5, 100, 200), RATE)
    audio = tone_turn(seconds=0.6, lead=0.2, tail=0.5)
    events = [e for start in range(0, len(audio), 1000) for e in vad.feed(audio[start:start + 1000])]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert 0.2 * RATE <= events[0].sample <= 0.3 * RATE  # the ramped tone crosses -35 dBFS a little after 0.2 s
    assert 0.7 * RATE <= events[1].sample <= 0.8 * RATE
    with pytest.raises(ValueError):
        VadSettings(threshold=1.5)


def test_input_buffer_cuts_turns_with_prefix_padding_and_forgets_cleared_speech():
    buffer = InputBuffer(RATE, "energy")  # a tone is not speech to Silero (tests/test_vad_noise.py)
    buffer.detect(VadSettings(0.5, 100, 200))
    audio = tone_turn(seconds=0.6, lead=0.3, tail=0.5)
    turns = [t for start in range(0, len(audio), 2400) for t in buffer.append(audio[start:start + 2400])]
    assert [type(t) for t in turns] == [TurnStarted, TurnEnded]
    assert 300 <= turns[0].ms <= 400 and 800 <= turns[1].ms <= 900
    assert abs(len(turns[1].audio) / RATE - (turns[1].ms - turns[0].ms + 100) / 1000) < 0.03
    assert len(buffer.audio) < len(audio) - len(turns[1].audio)  # the turn and what came before it are gone
    # speech, then a clear: the silence after it ends no turn
    loud = tone_turn(seconds=0.6, lead=0.0, tail=0.0)
    assert [type(t) for t in buffer.append(loud)] == [TurnStarted]
    assert len(buffer.take()) >= len(loud)
    assert buffer.append(np.zeros(RATE, np.float32)) == []
    buffer.detect(None)
    assert buffer.append(loud) == [] and len(buffer.audio) == RATE + len(loud)  # kept until a commit or clear


def test_voices_endpoint(client, omni):
    body = client.get("/v1/realtime/voices").json()
    assert body["voices"] == omni.voices and body["default"] == omni.default_voice


def test_two_voice_turns_with_server_vad(client, omni):
    with client.websocket_connect("/v1/realtime") as ws:
        created = json.loads(ws.receive_text())
        assert created["type"] == "session.created"
        assert created["session"]["audio"]["output"]["voice"] == omni.default_voice
        ws.send_text(json.dumps({"type": "session.update", "event_id": "e1", "session": {
            "type": "realtime", "instructions": "Be brief.", "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": VAD}, "output": {"voice": omni.voices[-1]}}}}))
        updated = json.loads(ws.receive_text())
        assert updated["type"] == "session.updated"
        assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 200
        assert updated["session"]["audio"]["output"]["voice"] == omni.voices[-1]
        previous = None
        for turn in range(2):
            send_audio(ws, speech.spoken_turn(turn))
            events = receive_until(ws, "response.done")
            order = kinds(events)
            assert order[:7] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                 "input_audio_buffer.committed", "conversation.item.created", "response.created",
                                 "response.output_item.added", "response.content_part.added"]
            assert order[-5:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                                  "response.content_part.done", "response.output_item.done", "response.done"]
            committed = events[2]
            assert events[0]["item_id"] == events[1]["item_id"] == committed["item_id"] == events[3]["item"]["id"]
            assert committed["previous_item_id"] == previous  # the conversation grows across turns
            assert events[3]["item"]["role"] == "user" and events[3]["item"]["content"][0]["type"] == "input_audio"
            audio = [e for e in events if e["type"] == "response.output_audio.delta"]
            transcript = [e for e in events if e["type"] == "response.output_audio_transcript.delta"]
            assert audio and transcript
            samples = sum(len(base64.b64decode(e["delta"])) // 2 for e in audio)
            assert samples > 0
            done = events[-1]["response"]
            assert done["status"] == "completed"
            assert done["output"][0]["content"][0]["transcript"] == "".join(e["delta"] for e in transcript)
            assert done["usage"]["output_tokens"] <= 6
            previous = done["output"][0]["id"]
            # the second turn's prompt holds the first turn: more input tokens
            if turn == 1:
                assert done["usage"]["input_tokens"] > first_input
            first_input = done["usage"]["input_tokens"]


def test_barge_in_cancels_the_reply(client):
    with client.websocket_connect("/v1/realtime") as ws:
        receive_until(ws, "session.created")
        ws.send_text(json.dumps({"type": "session.update", "session": {
            "turn_detection": VAD, "max_output_tokens": 400, "talker_max_new_tokens": 400}}))
        receive_until(ws, "session.updated")
        send_audio(ws, speech.spoken_turn(0))
        receive_until(ws, "response.created")
        send_audio(ws, speech.spoken_turn(1, lead=0.0, tail=0.0))  # the user speaks again over the reply
        events = receive_until(ws, "response.done")
        assert "input_audio_buffer.speech_started" in kinds(events)
        assert events[-1]["response"]["status"] == "cancelled"
        assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"
        # the interrupted turn ends (silence) and is answered in full
        ws.send_text(json.dumps({"type": "session.update", "session": {"max_output_tokens": 4,
                                                                       "talker_max_new_tokens": 4}}))
        send_audio(ws, np.zeros(int(0.5 * RATE), np.float32))
        events = receive_until(ws, "response.done")
        assert "input_audio_buffer.committed" in kinds(events)
        assert events[-1]["response"]["status"] == "completed"


def test_bad_events_get_errors_and_the_session_goes_on(client):
    with client.websocket_connect("/v1/realtime") as ws:
        receive_until(ws, "session.created")
        bad = [
            ("{not json", None, None),
            (json.dumps([1, 2]), None, None),
            (json.dumps({"type": "no.such.event", "event_id": "x1"}), "no.such.event", "x1"),
            (json.dumps({"type": "input_audio_buffer.commit", "event_id": "x2"}), "input_audio_buffer.commit", "x2"),
            (json.dumps({"type": "response.cancel", "event_id": "x3"}), "response.cancel", "x3"),
            (json.dumps({"type": "input_audio_buffer.append", "event_id": "x4", "audio": "@@@"}),
             "input_audio_buffer.append", "x4"),
            (json.dumps({"type": "conversation.item.create", "event_id": "x5",
                         "item": {"type": "message", "role": "user", "content": [{"type": "input_video"}]}}),
             "conversation.item.create", "x5"),
            (json.dumps({"type": "session.update", "event_id": "x6", "session": {"voice": "nobody"}}),
             "session.update", "x6"),
            (json.dumps({"type": "conversation.item.create", "event_id": "x8", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image",
                                                                "image_url": "data:image/png;base64,AAAA"}]}}),
             "conversation.item.create", "x8"),
            (json.dumps({"type": "conversation.item.create", "event_id": "x9", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text"}]}}),
             "conversation.item.create", "x9"),
            (json.dumps({"type": "response.create", "event_id": "x10", "extra": 1}), "response.create", "x10"),
        ]
        for text, event_type, event_id in bad:
            ws.send_text(text)
            error = json.loads(ws.receive_text())
            assert error["type"] == "error", text
            assert error["error"]["event_type"] == event_type and error["error"]["event_id"] == event_id
        ws.send_bytes(b"\x00\x01")
        assert json.loads(ws.receive_text())["type"] == "error"
        ws.send_text(json.dumps({"type": "session.update", "session": {"turn_detection": None,
                                                                       "output_modalities": ["text"]}}))
        assert receive_until(ws, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"] is None
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}}))
        assert json.loads(ws.receive_text())["type"] == "conversation.item.created"
        ws.send_text(json.dumps({"type": "conversation.item.create", "previous_item_id": "root", "item": {
            "id": "first", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}}))
        inserted = json.loads(ws.receive_text())
        assert inserted["item"]["id"] == "first" and inserted["previous_item_id"] is None
        ws.send_text(json.dumps({"type": "conversation.item.create", "event_id": "x11", "item": {
            "id": "first", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}}))
        assert json.loads(ws.receive_text())["error"]["event_id"] == "x11"  # ids are unique
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "id": "gone", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Bye."}]}}))
        assert json.loads(ws.receive_text())["item"]["id"] == "gone"
        for expected in ("conversation.item.deleted", "error"):  # deleted, then no longer there
            ws.send_text(json.dumps({"type": "conversation.item.delete", "item_id": "gone"}))
            assert json.loads(ws.receive_text())["type"] == expected
        ws.send_text(json.dumps({"type": "response.create"}))
        ws.send_text(json.dumps({"type": "response.create", "event_id": "x7"}))  # one reply at a time
        events = receive_until(ws, "response.done")
        errors = [e for e in events if e["type"] == "error"]
        assert len(errors) == 1 and errors[0]["error"]["event_id"] == "x7"
        assert errors[0]["error"]["code"] == "conversation_already_has_active_response"
        assert "response.output_text.delta" in kinds(events) or events[-1]["response"]["usage"]["output_tokens"]
        assert "response.output_audio.delta" not in kinds(events)
        # manual push-to-talk turn: append, commit, ask
        send_audio(ws, tone_turn(tail=0.1))
        ws.send_text(json.dumps({"type": "input_audio_buffer.commit"}))
        ws.send_text(json.dumps({"type": "response.create"}))
        events = receive_until(ws, "response.done")
        assert kinds(events)[:3] == ["input_audio_buffer.committed", "conversation.item.created", "response.created"]
        assert events[-1]["response"]["status"] == "completed"


def test_client_that_vanishes_mid_reply_does_not_break_the_server(client):
    with client.websocket_connect("/v1/realtime") as ws:
        receive_until(ws, "session.created")
        ws.send_text(json.dumps({"type": "session.update", "session": {"max_output_tokens": 300,
                                                                       "talker_max_new_tokens": 300}}))
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Talk."}]}}))
        ws.send_text(json.dumps({"type": "response.create"}))
        receive_until(ws, "response.created")
    # closed mid-reply; a new session is served at once (the old reply stopped and released the model)
    started = time.monotonic()
    with client.websocket_connect("/v1/realtime") as ws:
        receive_until(ws, "session.created")
        ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}))
        ws.send_text(json.dumps({"type": "response.create"}))
        assert receive_until(ws, "response.done")[-1]["response"]["status"] == "completed"
    assert time.monotonic() - started < 60


def test_half_open_socket_against_uvicorn(app):
    """A raw TCP client does the WebSocket handshake, asks for a reply and drops the connection without a close
    frame; the server must keep serving."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")
    from websockets.sync.client import connect

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="websockets-sansio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            json.loads(ws.recv(timeout=30))
            ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 300,
                                                                      "talker_max_new_tokens": 300}}))
            ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Talk."}]}}))
            ws.send(json.dumps({"type": "response.create"}))
            while json.loads(ws.recv(timeout=30))["type"] != "response.created":
                pass
            ws.socket.shutdown(socket.SHUT_RDWR)  # vanish: no close frame
        with connect(f"ws://127.0.0.1:{port}/v1/realtime") as again:
            assert json.loads(again.recv(timeout=30))["type"] == "session.created"
            again.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}))
            again.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 3}}))
            while (event := json.loads(again.recv(timeout=120)))["type"] != "response.done":
                pass
            assert event["response"]["status"] == "completed"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def text_turn(ws, text: str, **response) -> list[dict]:
    ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    ws.send_text(json.dumps({"type": "response.create", **({"response": response} if response else {})}))
    return receive_until(ws, "response.done")


def test_api_key_header_or_subprotocol(omni):
    app = FastAPI()
    app.include_router(realtime_router(omni, defaults={"max_output_tokens": 2, "output_modalities": ["text"]},
                                       api_key="sesame"))
    with TestClient(app) as client:
        for wrong in ({}, {"headers": {"Authorization": "Bearer nope"}},
                      {"subprotocols": ["realtime", "openai-insecure-api-key.nope"]}):
            with pytest.raises(WebSocketDisconnect) as refused:
                with client.websocket_connect("/v1/realtime", **wrong) as ws:
                    ws.receive_text()
            assert refused.value.code == 1008
        with client.websocket_connect("/v1/realtime", headers={"Authorization": "Bearer sesame"}) as ws:
            assert json.loads(ws.receive_text())["type"] == "session.created"
        offered = ["realtime", "openai-insecure-api-key.sesame"]
        with client.websocket_connect("/v1/realtime", subprotocols=offered) as ws:
            assert ws.accepted_subprotocol == "realtime"
            assert text_turn(ws, "Hi")[-1]["response"]["status"] == "completed"


def test_replies_on_the_http_servers_engine_worker(omni):
    engine_worker = pytest.importorskip("thinktalk.serve.engine_worker")
    omni.enable_batching(rows=2, max_len=512)  # the worker runs the persistent scheduler's loop
    worker = engine_worker.EngineWorker(omni, max_active=2, max_queued=4)
    worker.start()
    try:
        app = FastAPI()
        app.include_router(realtime_router(omni, runner=WorkerStreamRunner(worker), defaults={
            "max_output_tokens": 4, "talker_max_new_tokens": 4, "seed": 0}))
        with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
            receive_until(ws, "session.created")
            events = text_turn(ws, "Hello")
            assert events[-1]["response"]["status"] == "completed"
            assert "response.output_audio.delta" in kinds(events)
            ws.send_text(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "More."}]}}))
            ws.send_text(json.dumps({"type": "session.update", "session": {"max_output_tokens": 400,
                                                                           "talker_max_new_tokens": 400}}))
            ws.send_text(json.dumps({"type": "response.create"}))
            receive_until(ws, "response.created")
            ws.send_text(json.dumps({"type": "response.cancel"}))
            done = receive_until(ws, "response.done")[-1]["response"]
            assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
            deadline = time.monotonic() + 30
            while worker.counts != (0, 0) and time.monotonic() < deadline:  # the scheduler freed the stream
                time.sleep(0.05)
            assert worker.counts == (0, 0)
            assert omni.batching.leased == 0 and omni.talker_batching.leased == 0  # every row given back
    finally:
        worker.stop()
        omni.disable_batching()


def realtime_conversation(omni, turns: int, prefix_cache_bytes: int) -> tuple[list[str], list[tuple[int, int]]]:
    """`turns` text turns on one socket served by the engine worker -> (each reply's text, each turn's (prefilled,
    cached) prompt positions, from the scheduler's counters)."""
    engine_worker = pytest.importorskip("thinktalk.serve.engine_worker")
    omni.enable_batching(rows=2, max_len=2048, prefix_cache_bytes=prefix_cache_bytes)
    scheduler = omni.scheduler
    worker = engine_worker.EngineWorker(omni, max_active=2, max_queued=4)
    worker.start()
    replies, counters = [], []
    try:
        app = FastAPI()
        app.include_router(realtime_router(omni, runner=WorkerStreamRunner(worker), defaults={
            "max_output_tokens": 4, "seed": 0, "output_modalities": ["text"]}))
        with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
            receive_until(ws, "session.created")
            for turn in range(turns):
                before = scheduler.prefilled_positions, scheduler.cached_positions
                events = text_turn(ws, f"Turn {turn}: and then?")
                assert events[-1]["response"]["status"] == "completed"
                replies.append("".join(e["delta"] for e in events if e["type"] == "response.output_text.delta"))
                counters.append((scheduler.prefilled_positions - before[0], scheduler.cached_positions - before[1]))
    finally:
        worker.stop()
        omni.disable_batching()
    return replies, counters


def test_a_ten_turn_conversation_prefills_only_each_turns_new_tokens(omni):
    cold, cold_counts = realtime_conversation(omni, 10, prefix_cache_bytes=0)
    warm, warm_counts = realtime_conversation(omni, 10, prefix_cache_bytes=64 * 2**20)
    assert warm == cold, "a reply differs from its cold recomputation"
    assert all(cached == 0 for _, cached in cold_counts)
    for turn in range(1, 10):
        prefilled, cached = warm_counts[turn]
        assert prefilled + cached == cold_counts[turn][0]  # the same prompt, split between cache and prefill
        assert cached >= cold_counts[turn - 1][0], f"turn {turn} re-read part of the previous turn's prompt"
    assert sum(p for p, _ in warm_counts) < sum(p for p, _ in cold_counts) / 3
