"""The page against a server started with --api-key (the HTTP app, so /v1/* wants the key): it shows the served
model, asks for the key instead of showing "disconnected", keeps it for the tab (sessionStorage) and connects with
it as OpenAI's browser clients do (the `openai-insecure-api-key.KEY` subprotocol). The server side is checked with a
WebSocket client; the page in headless Chromium (skipped when it is not installed)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from test_serve_page import CHROMIUM, chromium_page  # noqa: E402
from thinktalk import Omni  # noqa: E402
from thinktalk.serve.app import create_app  # noqa: E402
from thinktalk.serve.realtime import DEMO_CONFIG, is_demo_checkpoint  # noqa: E402

KEY = "open-sesame"
SERVED = "keyed-omni"


@pytest.fixture(scope="module")
def server(tiny):
    torch.set_num_threads(1)
    omni = Omni.from_pretrained(tiny.path, device="cpu", dtype="float32")
    app = create_app(omni, served_model_name=SERVED, api_key=KEY, batch_rows=2, batch_max_len=512)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


def test_the_socket_takes_the_key_as_a_subprotocol_and_names_the_model(server):
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{server}/v1/realtime", subprotocols=["realtime"]).close()
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        connect(f"ws://{server}/v1/realtime", subprotocols=["realtime", "openai-insecure-api-key.wrong"]).close()
    with connect(f"ws://{server}/v1/realtime", subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(ws.recv(timeout=30))["session"]["model"] == SERVED
    info = json.loads(urllib.request.urlopen(f"http://{server}/v1/realtime/voices", timeout=10).read())
    assert info["model"] == SERVED and info["random_weights"] is False  # open: the page reads it before the key


def test_the_demo_checkpoint_is_recognised_by_its_config(tmp_path):
    from importlib import resources

    (tmp_path / "config.json").write_text(resources.files("thinktalk").joinpath(DEMO_CONFIG).read_text())
    assert is_demo_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_demo_checkpoint(tmp_path) and not is_demo_checkpoint(tmp_path / "missing")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_the_page_asks_for_the_key_keeps_it_for_the_tab_and_connects(server, tmp_path):
    with chromium_page(tmp_path / "profile") as page:
        page.call("Page.navigate", url=f"http://{server}/")
        page.wait_for("document.body && document.body.dataset.state === 'key'", timeout=30)
        assert page.evaluate("!document.getElementById('keyform').hidden")
        assert page.evaluate("document.getElementById('model').textContent") == SERVED
        assert page.evaluate("document.body.dataset.randomWeights") == "false"
        page.evaluate(f"document.getElementById('key').value = 'wrong';"
                      "document.getElementById('keyform').requestSubmit()")
        page.wait_for("document.getElementById('status').textContent.includes('refused')", timeout=30)
        page.evaluate(f"document.getElementById('key').value = '{KEY}';"
                      "document.getElementById('keyform').requestSubmit()")
        page.wait_for("document.body.dataset.state === 'ready' && "
                      "document.getElementById('voice').options.length > 0", timeout=30)
        assert page.evaluate("sessionStorage.getItem('thinktalk-api-key')") == KEY
        page.call("Page.reload")  # the same tab: connects with the kept key, no question
        page.wait_for("document.body && document.body.dataset.state === 'ready'", timeout=30)
        assert page.evaluate("document.getElementById('keyform').hidden")
        page.evaluate("document.getElementById('speak').checked = false;"
                      "document.getElementById('speak').dispatchEvent(new Event('change'));"
                      "document.getElementById('text').value = 'Hi'; document.getElementById('send').click()")
        page.wait_for("document.body.dataset.responsesDone === '1'", timeout=120)
        assert page.dataset()["lastStatus"] == "completed"

