"""The web page in headless Chromium, driven over the DevTools protocol, against a live server on the tiny model:
a text message, an attached audio file and a push-to-talk turn (Chromium's fake microphone) each get a streamed,
played reply. Skips when Chromium is not installed (/usr/bin/chromium)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium "
                                "(apt-get install -y chromium)")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from fastapi import FastAPI  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import speech  # noqa: E402
from thinktalk import Omni  # noqa: E402
from thinktalk.serve.realtime import realtime_router, static_router  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--window-size=1200,800", "--remote-debugging-port=0"]


class DevTools:
    """A minimal DevTools-protocol client for one page."""

    def __init__(self, socket):
        self.socket = socket
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; page state: {self.dataset()}")

    def dataset(self) -> dict:
        return json.loads(self.evaluate("JSON.stringify(document.body.dataset)"))


@pytest.fixture(scope="module")
def server(tiny):
    torch.set_num_threads(1)
    omni = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")
    app = FastAPI()
    app.include_router(realtime_router(omni, defaults={"max_output_tokens": 6, "talker_max_new_tokens": 8,
                                                       "seed": 0, "audio_chunk_frames": 2}))
    app.include_router(static_router())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


@contextlib.contextmanager
def chromium_page(profile: Path, *flags: str) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile, and a DevTools client for its one page (about:blank)."""
    browser = subprocess.Popen([str(CHROMIUM), *FLAGS, *flags, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        target = next(t for t in targets if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=64 * 2**20) as socket:
            tools = DevTools(socket)
            tools.call("Page.enable")
            yield tools
    finally:
        browser.terminate()
        browser.wait(timeout=30)


@pytest.fixture
def page(server, tmp_path):
    microphone = write_speech_wav(tmp_path / "microphone.wav")  # server VAD (Silero) answers speech, not beeps
    with chromium_page(tmp_path / "profile", f"--use-file-for-fake-audio-capture={microphone}") as tools:
        tools.call("Page.navigate", url=server + "/")
        tools.wait_for("document.body && document.body.dataset.state === 'ready' && "
                       "document.getElementById('voice').options.length > 0", timeout=30)
        yield tools


def write_speech_wav(path: Path) -> Path:
    """A short utterance and a second of silence (Chromium's fake microphone loops it), PCM16 at 24 kHz."""
    pcm = (np.clip(speech.spoken_turn(0, lead=0.5, tail=1.0), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(speech.RATE)
        out.writeframes(pcm.tobytes())
    return path


def write_tone_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def test_page_text_file_and_push_to_talk_turns(page, tmp_path):
    voices = page.evaluate("[...document.getElementById('voice').options].map(o => o.value)")
    assert voices and page.evaluate("document.getElementById('voice').value") in voices

    # 1. a text message: the reply's transcript and audio stream in and are played
    page.evaluate("document.getElementById('text').value = 'Hello there'; document.getElementById('send').click()")
    page.wait_for("document.body.dataset.responsesDone === '1'")
    data = page.dataset()
    assert data["lastStatus"] == "completed"
    assert int(data["audioChunks"]) > 0 and data["audioPlayed"] == data["audioChunks"]
    assert int(data["transcriptDeltas"]) > 0
    assert page.evaluate("document.querySelector('.msg.user').textContent") == "Hello there"
    assert page.evaluate("document.querySelector('.msg.assistant').textContent.length") > 0

    # 2. an attached audio file (decoded and resampled to 24 kHz PCM16 in the page) with a question
    wav = write_tone_wav(tmp_path / "tone.wav")
    document = page.call("DOM.getDocument")
    node = page.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#files")
    page.call("DOM.setFileInputFiles", files=[str(wav)], nodeId=node["nodeId"])
    page.wait_for("document.getElementById('attached').textContent === 'tone.wav'", timeout=10)
    page.evaluate("document.getElementById('text').value = 'What is this?'; document.getElementById('send').click()")
    page.wait_for("document.body.dataset.responsesDone === '2'")
    assert page.evaluate("[...document.querySelectorAll('.msg.user .tag')].length") == 1  # the audio part
    assert page.dataset()["lastStatus"] == "completed"

    # 3. push to talk with Chromium's fake microphone: AudioWorklet capture -> appends -> commit -> reply
    page.evaluate("pressTalk()", await_promise=True)
    page.wait_for("document.getElementById('talk').classList.contains('active')", timeout=10)
    time.sleep(1.0)
    page.evaluate("releaseTalk()")
    page.wait_for("document.body.dataset.responsesDone === '3'")
    data = page.dataset()
    assert data["lastStatus"] == "completed", page.evaluate("document.getElementById('log').innerText")
    assert page.evaluate("[...document.querySelectorAll('.msg.user .tag')].length") == 2
    assert not page.evaluate("document.querySelector('.msg.error')")

    # 4. hands-free: server VAD on the fake microphone's looped utterance finds turns and answers them (the page's
    # silence setting shortened)
    page.evaluate("VAD.silence_duration_ms = 250; document.getElementById('mode').value = 'vad';"
                  "document.getElementById('mode').dispatchEvent(new Event('change'))")
    page.evaluate("pressTalk()", await_promise=True)
    page.wait_for("Number(document.body.dataset.speechStopped || 0) >= 1 && "
                  "Number(document.body.dataset.responsesDone) >= 4", timeout=60)
    page.evaluate("pressTalk()", await_promise=True)  # stop listening
    assert page.evaluate("document.getElementById('talk').textContent") == "Start listening"

    # 5. the camera (Chromium's fake video): its frame rides along with a typed message; camera frames sent on
    # their own are kept to the latest two in the conversation
    page.evaluate("document.getElementById('camera').click()")
    page.wait_for("document.getElementById('preview').videoWidth > 0", timeout=20)
    page.evaluate("document.getElementById('text').value = 'What do you see?'; document.getElementById('send').click()")
    page.wait_for("document.body.dataset.responsesDone === '5'", timeout=120)
    assert page.evaluate("document.querySelectorAll('.msg.user img').length") == 1
    assert page.dataset()["lastStatus"] == "completed"
    page.evaluate("sendFrame(); sendFrame(); sendFrame()")
    page.wait_for("document.querySelectorAll('[data-item^=\"camera_\"]').length === 2", timeout=20)
    time.sleep(0.5)
    assert page.evaluate("document.querySelectorAll('[data-item^=\"camera_\"]').length") == 2
    assert not page.evaluate("document.querySelector('.msg.error')"), page.evaluate("document.body.innerText")

    shot = page.call("Page.captureScreenshot", format="png")["data"]
    path = tmp_path / "page.png"
    path.write_bytes(base64.b64decode(shot))
    assert path.stat().st_size > 10_000
    shutil.copy(path, Path(tempfile.gettempdir()) / "thinktalk_page.png")  # to look at after a run
