"""The OpenAI-compatible server driven by the official `openai` client, on the tiny random checkpoint.

The server runs in a background thread on 127.0.0.1 (a free port). Random weights say nothing meaningful, so the
tests check the protocol: shapes, sizes, ordering of stream events, interleaving of concurrent requests.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import wave

import httpx
import pytest
from media import noise_image, wav_bytes, write_video

from thinktalk.omni import Omni
from thinktalk.processing.tools import ToolCall
from thinktalk.serve.app import create_app
from thinktalk.serve.chat import TextGate, openai_tool_calls, stream_settings
from thinktalk.serve.local import BackgroundServer
from thinktalk.serve.schemas import AudioOptions, ChatCompletionRequest, ServerLimits

openai = pytest.importorskip("openai")

MODEL = "tiny-omni"
SAMPLES_PER_FRAME, LOOKAHEAD = 1920, 555
SPEECH = {"voice": "ethan", "format": "wav", "max_seconds": 0.8}  # 0.8 s -> at most 11 codec frames


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_media")
    write_video(folder / "clip.mp4", seconds=1.0, fps=4, size=(64, 64))
    noise_image(64, 64).save(folder / "noise.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny, media_dir):
    omni = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")
    app = create_app(omni, MODEL, allowed_local_media_path=media_dir, limits=ServerLimits(default_max_tokens=8))
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def wav_data_url(seconds: float) -> str:
    return base64.b64encode(wav_bytes(seconds)).decode()


def png_data_url() -> str:
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_lists_the_served_name(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert "/v1/chat/completions" in httpx.get(server + "/openapi.json").json()["paths"]
    assert "ethan" in httpx.get(server + "/v1/realtime/voices").json()["voices"]  # the Realtime socket is mounted
    assert httpx.get(server + "/").headers["content-type"].startswith("text/html")  # and the web page


def test_text_chat(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("Hello!"), max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert isinstance(choice.message.content, str) and choice.message.audio is None
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=user("Hello!"), max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_seeded_sampling_repeats(client):
    ask = dict(model=MODEL, messages=user("Hi"), max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert (client.chat.completions.create(**ask).choices[0].message.content
            == client.chat.completions.create(**ask).choices[0].message.content)


def test_audio_out_is_a_wav_matching_the_frames(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("Say something."), max_tokens=6,
                                           temperature=0, modalities=["text", "audio"], audio=SPEECH)
    audio = reply.choices[0].message.audio
    assert audio.id and audio.expires_at > time.time() and audio.transcript == reply.choices[0].message.content
    with wave.open(io.BytesIO(base64.b64decode(audio.data))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        samples = wav.getnframes()
    frames = reply.usage.completion_tokens_details.audio_tokens
    assert 1 <= frames <= 11
    assert samples == frames * SAMPLES_PER_FRAME - LOOKAHEAD


@pytest.mark.parametrize("fmt", ["pcm16", "flac"])
def test_audio_out_formats(client, fmt):
    reply = client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=3, temperature=0,
                                           modalities=["text", "audio"], audio=dict(SPEECH, format=fmt))
    data = base64.b64decode(reply.choices[0].message.audio.data)
    frames = reply.usage.completion_tokens_details.audio_tokens
    if fmt == "pcm16":
        assert len(data) == 2 * (frames * SAMPLES_PER_FRAME - LOOKAHEAD)
    else:
        assert data[:4] == b"fLaC"


def test_streaming_sends_audio_before_the_last_text(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("Tell me a story."), max_tokens=12, temperature=1.0, seed=3, stream=True,
        modalities=["text", "audio"], audio=dict(SPEECH, format="pcm16"), stream_options={"include_usage": True})
    order, pcm, transcript, usage, finish = [], b"", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            finish = choice.finish_reason or finish
            if delta.content:
                order.append("text")
                transcript += delta.content
            audio = getattr(delta, "audio", None)
            if audio is not None and audio.data:
                order.append("audio")
                pcm += base64.b64decode(audio.data)
    assert finish in ("stop", "length") and usage is not None
    assert "audio" in order and "text" in order
    last_text = len(order) - 1 - order[::-1].index("text")
    assert order.count("text") > 1, order
    assert order.index("audio") < last_text, order  # speech starts while the text is still being written
    frames = usage.completion_tokens_details.audio_tokens
    assert len(pcm) == 2 * (frames * SAMPLES_PER_FRAME - LOOKAHEAD)


def test_stop_string_cuts_the_text(client):
    full = client.chat.completions.create(model=MODEL, messages=user("Hello"), max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    if len(text) < 4:
        pytest.skip("the random model wrote too little text to cut")
    stop = text[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=user("Hello"), max_tokens=12, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=user("Hello"), max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == text[:text.find(stop)]


def test_image_audio_and_video_inputs(client, media_dir):
    content = [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "input_audio", "input_audio": {"data": wav_data_url(1.0), "format": "wav"}},
        {"type": "video_url", "video_url": {"url": (media_dir / "clip.mp4").as_uri()}},
        {"type": "image_url", "image_url": {"url": (media_dir / "noise.png").as_uri()}},
        {"type": "text", "text": "What do you see and hear?"},
    ]
    plain = client.chat.completions.create(model=MODEL, messages=user(content), max_tokens=3, temperature=0)
    with_sound = client.chat.completions.create(model=MODEL, messages=user(content), max_tokens=3, temperature=0,
                                                extra_body={"use_audio_in_video": True})
    text_only = client.chat.completions.create(model=MODEL, messages=user("What do you see?"), max_tokens=3)
    assert plain.usage.prompt_tokens > text_only.usage.prompt_tokens + 20
    assert with_sound.usage.prompt_tokens > plain.usage.prompt_tokens  # the video's sound track joined the prompt


def test_tools_round_trip_schema(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    history = user("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=tools, tool_choice="auto",
                                           max_tokens=5, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in message.tool_calls or []:
        assert call.id.startswith("call_") and call.type == "function" and json.loads(call.function.arguments)
    without = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), max_tokens=2)
    offered = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), max_tokens=2,
                                             tools=tools)
    assert offered.usage.prompt_tokens > without.usage.prompt_tokens  # the tool definitions are in the prompt


def test_tool_calls_convert_to_openai_form():
    calls = openai_tool_calls((ToolCall("get_weather", {"city": "Paris", "days": 2}, "raw"), ToolCall("f", {}, "")))
    assert [c.function.name for c in calls] == ["get_weather", "f"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert calls[0].type == "function" and calls[0].id.startswith("call_") and calls[0].id != calls[1].id


def test_text_gate_holds_stops_and_tool_calls():
    gate = TextGate(("STOP",), ("<tool_call>",))
    assert gate.push("Hello ST") == "Hello "
    assert gate.push("AY <tool") == "STAY "
    assert gate.push("_call>{\"name\"") == "" and gate.holding
    gate = TextGate(("END",))
    assert gate.push("abcE") == "abc" and gate.push("NDxyz") == "" and gate.stopped and gate.text == "abc"
    gate = TextGate(())
    assert gate.push("a") == "a" and gate.flush() == ""


def test_transcription(client, server):
    audio = base64.b64decode(wav_data_url(1.5))
    result = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", audio, "audio/wav"))
    assert isinstance(result.text, str)
    verbose = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", audio, "audio/wav"),
                                                 response_format="verbose_json", language="zh")
    assert verbose.duration == pytest.approx(1.5, abs=0.01) and verbose.language == "zh"
    text = httpx.post(server + "/v1/audio/transcriptions", files={"file": ("a.wav", audio, "audio/wav")},
                      data={"model": MODEL, "response_format": "text"}, timeout=60)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")


def test_concurrent_streams_interleave(client):
    seen: dict[str, list[float]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str, seed: int) -> None:
        try:
            stream = client.chat.completions.create(model=MODEL, messages=user(f"Story {name}"), max_tokens=16,
                                                    temperature=1.0, seed=seed, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    seen[name].append(time.perf_counter())
        except BaseException as error:  # re-raised in the test thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name, seed)) for name, seed in (("a", 1), ("b", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    a, b = seen["a"], seen["b"]
    assert len(a) >= 2 and len(b) >= 2, (len(a), len(b))
    assert a[0] < b[-1] and b[0] < a[-1]  # both made progress before either finished


def wait_idle(server: str, seconds: float = 20) -> int:
    deadline = time.monotonic() + seconds
    while (active := httpx.get(server + "/health").json()["active_requests"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return active


def test_client_leaving_a_plain_request_frees_the_worker(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", timeout=1.0, json={
            "model": MODEL, "messages": user("Go on"), "max_tokens": 4000, "modalities": ["text", "audio"],
            "audio": {"max_seconds": 300}})
    assert wait_idle(server) == 0


def test_cancelled_stream_frees_the_worker(client, server):
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": user("Go on and on"), "max_tokens": 200, "stream": True,
            "modalities": ["text", "audio"], "audio": {"format": "pcm16", "max_seconds": 30}}) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
    assert wait_idle(server) == 0


def test_over_http_a_reply_without_max_seconds_is_guarded_and_capped_by_the_server():
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                                 "modalities": ["text", "audio"]})
    limits = ServerLimits(max_audio_output_seconds=30.0)
    speech = stream_settings(body, ["ethan"], True, ("wav", "pcm16"), limits).request.speech
    assert (speech.max_seconds, speech.ceiling_seconds) == (None, 30.0)  # None: the runaway guard applies
    body = body.model_copy(update={"audio": AudioOptions(voice="Ethan", format="wav", max_seconds=99.0)})
    speech = stream_settings(body, ["ethan"], True, ("wav", "pcm16"), limits).request.speech
    assert (speech.voice, speech.max_seconds) == ("ethan", 30.0)
