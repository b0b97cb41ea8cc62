"""The hostile corpus (tests/hostile_media.py) and the field, text and protocol cases that once got a 500, a raw
exception or an open connection, over HTTP: each is a 4xx in OpenAI's error shape whose `param` names the request
field, none is a 5xx, and the server stays healthy after each."""

from __future__ import annotations

import base64
import json
import signal
import socket

import httpx
import pytest
from hostile_media import AUDIO, FORGED_TURN, IMAGES, VIDEOS, png_bytes, video_bytes, wav_with_header

from thinktalk.omni import Omni
from thinktalk.processing import audio as audio_module
from thinktalk.serve.app import create_app
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.schemas import ServerLimits

MODEL = "tiny-omni"
LIMITS = ServerLimits(max_media_bytes=512 * 2**10, max_audio_seconds=3.0, max_video_seconds=6.0, max_tokens=64,
                      default_max_tokens=2, max_model_len=512, body_read_timeout_seconds=1.0)
PART = "messages[0].content[0]"


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32", audio_output=False)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "ok.png").write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def served(omni, allowed):
    app = create_app(omni, MODEL, allowed_local_media_path=allowed, allow_remote_media=True, limits=LIMITS)
    with BackgroundServer(app) as url:
        yield url


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(*parts, **extra) -> dict:
    content = list(parts) + [{"type": "text", "text": "hi"}]
    return dict({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}, **extra)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def post(url: str, payload) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json"})


def check_refused(url: str, response: httpx.Response, status: int, param: str | None, code: str | None = None):
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert httpx.get(url + "/health").json()["status"] == "ok"


FIELD_CASES = {  # name -> (request, the param the 400 names)
    "max_tokens_true": (chat(max_tokens=True), "max_tokens"),
    "stream_yes": (chat(stream="yes"), "stream"),
    "seed_2_70": (chat(seed=2**70), "seed"),
    "temperature_string": (chat(temperature="0.5"), "temperature"),
    "use_audio_in_video_int": (chat(use_audio_in_video=1), "use_audio_in_video"),
    "content_number": ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "unknown_part_type": (chat({"type": "hologram"}), PART),
    "file_url_nul": (chat(image("file:///ALLOWED/a%00b.png")), PART),
    "remote_bad_ipv6": (chat(image("http://[::1/a.png")), PART),
    "remote_bad_port": (chat(image("http://example.com:99999/a.png")), PART),
}


@pytest.mark.parametrize("name", sorted(FIELD_CASES))
def test_bad_fields_name_their_param(served, allowed, name):
    payload, param = FIELD_CASES[name]
    text = json.dumps(payload).replace("/ALLOWED", str(allowed))
    check_refused(served, post(served, text.encode()), 400, param)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hostile_images(served, name):
    check_refused(served, post(served, chat(image("data:image/png;base64," + b64(IMAGES[name]())))), 400, PART)


@pytest.mark.parametrize("name", sorted(AUDIO))
def test_hostile_audio(served, name):
    audio = {"type": "input_audio", "input_audio": {"data": b64(AUDIO[name]())}}
    check_refused(served, post(served, chat(audio)), 400, PART)


@pytest.mark.parametrize("rate", [1, 2**31 - 1])
def test_absurd_rates_are_refused_before_resampling(served, monkeypatch, rate):
    def refuse(*args):
        raise AssertionError("resampled before the rate was checked")
    monkeypatch.setattr(audio_module, "resample", refuse)
    audio = {"type": "input_audio", "input_audio": {"data": b64(wav_with_header(rate, seconds_of_data=6.0))}}
    check_refused(served, post(served, chat(audio)), 400, PART, "invalid_audio")


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_hostile_videos(served, name, tmp_path):
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(VIDEOS[name](tmp_path))}}
    check_refused(served, post(served, chat(video)), 400, PART)


def test_a_heard_sound_track_counts_against_the_audio_limit(served, tmp_path):
    """A 4 s clip passes the video limit (6 s); heard, its 4 s sound track does not pass the audio limit (3 s)."""
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(video_bytes(tmp_path, 4.0))}}
    check_refused(served, post(served, chat(video, use_audio_in_video=True)), 400, PART, "audio_too_long")
    assert post(served, chat(video)).status_code == 200


def test_a_video_past_its_limit_is_refused_from_its_container(served, tmp_path):
    long = video_bytes(tmp_path, seconds=7.0, audio=False)
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(long)}}
    check_refused(served, post(served, chat(video)), 400, PART, "video_too_long")


def test_a_lone_surrogate_is_a_400(served):
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}' % MODEL)
    check_refused(served, post(served, body.encode()), 400, PART)


def test_a_prompt_past_max_model_len_is_a_400_naming_both_numbers(served):
    response = post(served, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}],
                             "max_tokens": 8})
    check_refused(served, response, 400, "messages", "context_length_exceeded")
    assert "maximum context length is 512 tokens. However, you requested" in response.json()["error"]["message"]


def test_a_forged_turn_is_answered_as_text(served):
    response = post(served, {"model": MODEL, "messages": [{"role": "user", "content": FORGED_TURN}],
                             "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > len(FORGED_TURN) // 4  # the markers spelled out, not merged


def test_a_body_shorter_than_its_content_length_gets_408(served):
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"model\": ")
        reply = b""
        while b"request_timeout" not in reply.replace(b" ", b""):  # headers and body may come in separate packets
            piece = connection.recv(65536)
            if not piece:
                break
            reply += piece
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert '"code":"request_timeout"' in reply.replace(" ", "")


def test_shutdown_ends_an_in_flight_stream_cleanly(omni):
    """SIGTERM (uvicorn's handle_exit) with a stream running: the stream ends with the shutdown error as its last
    event, the server stops, and the engine holds no request."""
    app = create_app(omni, MODEL, limits=ServerLimits(max_tokens=8192))
    background = BackgroundServer(app)
    with background as url:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 8000,
                   "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the stream is running
            background.server.handle_exit(signal.SIGTERM, None)
            events = [line for line in lines if line.startswith("data: ")]
    background.thread.join(60)
    assert not background.thread.is_alive()
    assert events and "server_shutting_down" in events[-1], events[-3:]
    assert app.state.server.worker.counts == (0, 0)
