"""Small things a new user meets first: the page's icon, and malformed JSON named as such (no `param` like "9")."""

import pytest
from fastapi.testclient import TestClient

from thinktalk import Omni
from thinktalk.serve.app import REQUEST_FIELDS, create_app


@pytest.fixture(scope="module")
def client(tiny):
    omni = Omni.from_pretrained(tiny.path, device="cpu", audio_output=False)
    with TestClient(create_app(omni, batch_rows=0)) as client:
        yield client


def test_the_page_has_an_icon(client):
    assert 'rel="icon" href="/favicon.svg"' in client.get("/").text
    for path in ("/favicon.svg", "/favicon.ico"):  # browsers ask for /favicon.ico without being told
        icon = client.get(path)
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        assert icon.content.startswith(b"<svg") and len(icon.content) < 2048


@pytest.mark.parametrize("body", [b'{"model": "m", "messages": [', b'{"model": "m",}', b"{bad", b"\xff\xfe",
                                  b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]} trailing'])
def test_malformed_json_is_named_without_a_nonsense_param(client, body):
    reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["code"] == "invalid_json" and "not valid JSON" in error["message"]
    assert error["param"] is None or error["param"] in REQUEST_FIELDS
