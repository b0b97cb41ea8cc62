"""Hostile requests: each gets a clean 4xx in OpenAI's error shape, nothing leaks, and the server keeps serving.

The server requires an API key, allows file:// media under one folder and remote media (so that the address check,
not the switch, is what refuses loopback / link-local / private hosts: nothing is ever connected to), and has
small limits so that the over-limit cases stay cheap. Schemathesis fuzzes /openapi.json at the end (no 5xx).
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from media import noise_image, wav_bytes

from thinktalk.omni import Omni
from thinktalk.serve.app import create_app
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.media import is_public_address
from thinktalk.serve.schemas import ServerLimits

schemathesis = pytest.importorskip("schemathesis")

MODEL, KEY = "tiny-omni", "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerLimits(max_body_bytes=2 * 2**20, max_media_bytes=512 * 2**10, max_audio_seconds=3.0, max_images=2,
                      max_videos=1, max_audios=2, max_image_pixels=4 * 2**20, max_tokens=64, default_max_tokens=4,
                      max_audio_output_seconds=0.5)


@pytest.fixture(scope="module")
def omni(tiny):
    return Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "allowed").mkdir()
    (root / "secret.png").write_bytes(_png_bytes())
    noise_image(32, 32).save(root / "allowed" / "ok.png")
    (root / "allowed" / "escape.png").symlink_to(root / "secret.png")
    return root / "allowed"


@pytest.fixture(scope="module")
def server(omni, allowed):
    app = create_app(omni, MODEL, api_key=KEY, allowed_local_media_path=allowed, allow_remote_media=True,
                     limits=LIMITS)
    with BackgroundServer(app) as url:
        yield url


def _png_bytes(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    noise_image(size, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be huge: IHDR with the size, a tiny IDAT (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")


def _bilevel_png(width: int, height: int) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()




def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts, **extra) -> dict:
    content = list(parts) + [{"type": "text", "text": "hi"}]
    return dict({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}, **extra)


FUZZ_EXAMPLES = 40
PNG_URL = "data:image/png;base64," + b64(_png_bytes())

# name -> (JSON body, or raw bytes with a content type), expected status
CASES = {
    "malformed_json": (b'{"model": "tiny-omni", "messages": [', 400),
    "body_is_a_list": (b"[1, 2, 3]", 400),
    "invalid_utf8": (b'{"model": "\xff\xfe"}', 400),
    "deeply_nested": (b'{"model": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
    "missing_messages": ({"model": MODEL}, 400),
    "empty_messages": ({"model": MODEL, "messages": []}, 400),
    "messages_wrong_type": ({"model": MODEL, "messages": "hello"}, 400),
    "temperature_wrong_type": (chat(temperature="hot"), 400),
    "temperature_out_of_range": (chat(temperature=5), 400),
    "max_tokens_zero": (chat(max_tokens=0), 400),
    "max_tokens_over_limit": (chat(max_tokens=100000), 400),
    "n_above_one": (chat(n=3), 400),
    "unknown_role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "unknown_part_type": ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, 400),
    "image_without_url": (chat({"type": "image_url", "image_url": {}}), 400),
    "too_many_stops": (chat(stop=["a", "b", "c", "d", "e"]), 400),
    "huge_stop": (chat(stop="x" * 10000), 400),
    "unknown_model": (dict(chat(), model="gpt-5"), 404),
    "unknown_voice": (chat(modalities=["text", "audio"], audio={"voice": "darth"}), 400),
    "bad_modality": (chat(modalities=["smell"]), 400),
    "stream_format_unsupported": (chat(stream=True, modalities=["text", "audio"], audio={"format": "mp3"}), 400),
    "tool_choice_unknown": (chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                 tool_choice={"type": "function", "function": {"name": "g"}}), 400),
    "bad_base64_audio": (chat({"type": "input_audio", "input_audio": {"data": "@@not base64@@", "format": "wav"}}),
                         400),
    "bad_base64_image": (chat(image("data:image/png;base64,%%%%")), 400),
    "data_url_without_comma": (chat(image("data:image/png;base64")), 400),
    "plain_path_url": (chat(image("/etc/passwd")), 400),
    "ftp_url": (chat(image("ftp://example.com/a.png")), 400),
    "corrupt_image": (chat(image("data:image/png;base64," + b64(b"\x89PNG not really" * 10))), 400),
    "corrupt_audio": (chat({"type": "input_audio", "input_audio": {"data": b64(b"RIFF garbage" * 50)}}), 400),
    "corrupt_video": (chat({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(b"\0" * 900)}}),
                      400),
    "decompression_bomb_header": (chat(image("data:image/png;base64," + b64(_png_header_only(40000, 40000)))), 400),
    "image_over_pixel_cap": (chat(image("data:image/png;base64," + b64(_bilevel_png(5000, 5000)))), 400),
    "media_over_byte_cap": (chat(image("data:image/png;base64," + "A" * (800 * 2**10))), 400),
    "too_many_images": (chat(image(PNG_URL), image(PNG_URL), image(PNG_URL)), 400),
    "audio_over_cap": (chat({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(4.0))}}), 400),
    "file_url_traversal": (chat(image("file:///ALLOWED/../secret.png")), 400),
    "file_url_outside": (chat(image("file:///etc/passwd")), 400),
    "file_url_symlink_out": (chat(image("file:///ALLOWED/escape.png")), 400),
    "file_url_missing": (chat(image("file:///ALLOWED/nothing.png")), 400),
    "remote_loopback": (chat(image("http://127.0.0.1:1/a.png")), 400),
    "remote_metadata": (chat(image("http://169.254.169.254/latest/meta-data/")), 400),
    "remote_private": (chat(image("http://10.0.0.1/a.png")), 400),
    "remote_ipv6_loopback": (chat(image("http://[::1]:8080/a.png")), 400),
    "remote_localhost_name": (chat(image("https://localhost/a.png")), 400),
    "remote_mapped_v4": (chat(image("http://[::ffff:127.0.0.1]/a.png")), 400),
    "body_over_cap": (chat(padding="x" * (3 * 2**20)), 413),
}


def check_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_chat_request(server, allowed, name):
    payload, status = CASES[name]
    if isinstance(payload, bytes):
        response = httpx.post(server + "/v1/chat/completions", content=payload, timeout=60,
                              headers=dict(AUTH, **{"Content-Type": "application/json"}))
    else:
        text = httpx.Request("POST", "/", json=payload).content.decode().replace("/ALLOWED", str(allowed))
        response = httpx.post(server + "/v1/chat/completions", content=text.encode(), timeout=60,
                              headers=dict(AUTH, **{"Content-Type": "application/json"}))
    check_error(response, status)


def test_api_key_is_required(server):
    check_error(httpx.post(server + "/v1/chat/completions", json=chat()), 401)
    check_error(httpx.post(server + "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer no"}), 401)
    check_error(httpx.get(server + "/v1/models", headers={"Authorization": KEY}), 401)
    assert httpx.get(server + "/health").status_code == 200  # open


def test_chunked_body_over_cap(server):
    def body():
        yield b'{"model": "tiny-omni", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 2**16
        yield b'"}]}'
    check_error(httpx.post(server + "/v1/chat/completions", content=body(), timeout=60,
                           headers=dict(AUTH, **{"Content-Type": "application/json"})), 413)


@pytest.mark.parametrize("case", ["garbage", "no_file", "srt", "corrupt_audio", "unknown_model"])
def test_hostile_transcription(server, case):
    url, files, data = server + "/v1/audio/transcriptions", {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}, {
        "model": MODEL}
    if case == "garbage":
        response = httpx.post(url, content=b"--xx\r\nnot multipart at all", timeout=30,
                              headers=dict(AUTH, **{"Content-Type": "multipart/form-data; boundary=xx"}))
    elif case == "no_file":
        response = httpx.post(url, data=data, files={"other": ("a.txt", b"x")}, headers=AUTH, timeout=30)
    elif case == "srt":
        response = httpx.post(url, data=dict(data, response_format="srt"), files=files, headers=AUTH, timeout=30)
    elif case == "corrupt_audio":
        response = httpx.post(url, data=data, files={"file": ("a.wav", b"RIFF" + b"\0" * 500)}, headers=AUTH,
                              timeout=30)
    else:
        response = httpx.post(url, data={"model": "whisper-1"}, files=files, headers=AUTH, timeout=30)
    check_error(response, 404 if case == "unknown_model" else 400)


def test_wrong_method_and_path(server):
    check_error(httpx.get(server + "/v1/chat/completions", headers=AUTH), 405)
    check_error(httpx.get(server + "/v1/nothing", headers=AUTH), 404)


def test_address_check():
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1",
                    "fc00::1", "0.0.0.0", "224.0.0.1", "::ffff:10.0.0.1", "100.64.0.1"):
        assert not is_public_address(address), address
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700::1111")


def test_normal_request_after_the_corpus(server):
    response = httpx.post(server + "/v1/chat/completions", json=chat(image(PNG_URL)), headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_busy_server_answers_429(omni):
    limits = ServerLimits(max_active=1, max_queued=0, retry_after_seconds=2)
    with BackgroundServer(create_app(omni, MODEL, limits=limits)) as url:
        long = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 64, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=60) as first:
            assert first.status_code == 200
            second = httpx.post(url + "/v1/chat/completions", json=chat(), timeout=60)
            check_error(second, 429)
            assert second.headers["Retry-After"] == "2"
            for _ in first.iter_lines():
                pass
        deadline = threading.Event()
        deadline.wait(0.2)
        assert httpx.post(url + "/v1/chat/completions", json=chat(), timeout=60).status_code == 200


def test_fuzz_openapi_no_server_errors(server):
    """Schemathesis generates requests from /openapi.json for every operation (bounded); none may answer 5xx."""
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def call(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # past the model check, into the request's handling
            response = case.call(headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        call()
