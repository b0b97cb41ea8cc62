"""`thinktalk serve --ssl-certfile/--ssl-keyfile`: bad files are one clear error before startup; a live server
with a self-signed certificate made here answers over https and wss (Python's websockets, and the Node SDK's
OpenAIRealtimeWS where node and npm are available)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from thinktalk.cli import main  # noqa: E402
from thinktalk.serve.app import TlsFileError, check_tls_files  # noqa: E402

KEY = "sesame"
SERVED = "tls-omni"
NODE_CACHE = Path(tempfile.gettempdir()) / "thinktalk-node-openai"  # npm install openai ws, once per machine
NODE_CLIENT = r"""
const { OpenAI } = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");
const client = new OpenAI({ apiKey: process.env.KEY, baseURL: process.env.BASE });
const rt = new OpenAIRealtimeWS({ model: process.env.MODEL }, client);
const seen = [];
let model = null;
setTimeout(() => { console.log(JSON.stringify({ timeout: true, seen })); process.exit(3); }, 120000);
rt.on("event", (event) => seen.push(event.type));
rt.on("error", (err) => { console.log(JSON.stringify({ error: String(err.message), seen })); process.exit(2); });
rt.on("session.created", (event) => {
  model = event.session.model;
  rt.send({ type: "session.update", session: { type: "realtime", output_modalities: ["text"] } });
  rt.send({ type: "conversation.item.create", item: { type: "message", role: "user",
            content: [{ type: "input_text", text: "Hi" }] } });
  rt.send({ type: "response.create", response: { max_output_tokens: 3 } });
});
rt.on("response.done", (event) => {
  console.log(JSON.stringify({ model, status: event.response.status, seen }));
  rt.close();
  process.exit(0);
});
"""


def self_signed(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_bad_tls_files_are_refused_before_startup(tmp_path, capsys):
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    check_tls_files(str(cert), str(key))
    check_tls_files(None, None)
    for certfile, keyfile, words in ((str(tmp_path / "nope.crt"), str(key), "--ssl-certfile"),
                                     (str(cert), str(tmp_path), "--ssl-keyfile"),  # a folder: unreadable
                                     (str(cert), str(other_key), "not a PEM certificate and its private key"),
                                     (str(key), None, "not a PEM certificate"),
                                     (None, str(key), "needs --ssl-certfile")):
        with pytest.raises(TlsFileError, match=words):
            check_tls_files(certfile, keyfile)
    code = main(["serve", "--ssl-certfile", str(tmp_path / "missing.pem"), "--ssl-keyfile", str(key)])
    err = capsys.readouterr().err
    assert code == 2 and "error: --ssl-certfile" in err and "missing.pem" in err and "Traceback" not in err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tls_server(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder)
    port = free_port()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "thinktalk.cli", "serve", "--model", str(tiny.path), "--port", str(port),
         "--device", "cpu", "--threads", "1", "--api-key", KEY, "--served-model-name", SERVED,
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--batch-rows", "2", "--batch-max-len", "512"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()
            try:
                if httpx.get(base + "/health", verify=str(cert), timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.5)
        yield base, cert
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_https_and_wss_with_a_self_signed_certificate(tls_server):
    import ssl

    from websockets.sync.client import connect

    base, cert = tls_server
    models = httpx.get(base + "/v1/models", verify=str(cert), headers={"Authorization": f"Bearer {KEY}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == SERVED
    with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by a client that checks
        httpx.get(base + "/health", timeout=5)
    context = ssl.create_default_context(cafile=str(cert))
    url = base.replace("https://", "wss://") + "/v1/realtime"
    with connect(url, ssl=context, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        created = json.loads(ws.recv(timeout=30))
        assert created["type"] == "session.created" and created["session"]["model"] == SERVED


def node_sdk() -> Path:
    """A folder with the npm packages `openai` and `ws` installed (once, cached); skips without node / npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Node SDK's OpenAIRealtimeWS is not tried")
    if not (NODE_CACHE / "node_modules" / "openai" / "realtime" / "ws.js").is_file():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund",
                            "--no-save", "--fetch-timeout=30000", "--fetch-retries=1", "openai", "ws"],
                           check=True, capture_output=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"npm could not install openai and ws (registry unreachable?): {exc}")
    return NODE_CACHE


def test_node_sdks_realtime_ws_client_over_wss(tls_server, tmp_path):
    base, cert = tls_server
    folder = node_sdk()
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    env = {**os.environ, "NODE_PATH": str(folder / "node_modules"), "NODE_EXTRA_CA_CERTS": str(cert),
           "KEY": KEY, "BASE": base + "/v1", "MODEL": SERVED}
    run = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["model"] == SERVED and result["status"] == "completed"
    assert result["seen"][0] == "session.created" and "response.content_part.added" in result["seen"]


def test_python_sdks_realtime_client_over_wss(tls_server):
    import ssl

    openai = pytest.importorskip("openai")
    base, cert = tls_server
    client = openai.OpenAI(api_key=KEY, base_url=base + "/v1")
    options = {"ssl": ssl.create_default_context(cafile=str(cert))}
    with client.realtime.connect(model=SERVED, websocket_connection_options=options) as connection:
        created = connection.recv()  # parsed into the SDK's own event models
        assert created.type == "session.created" and created.session.model == SERVED
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hi"}]})
        connection.response.create(response={"max_output_tokens": 3})
        seen = []
        for event in connection:
            seen.append(event.type)
            if event.type == "response.done":
                break
    assert event.response.status == "completed" and "response.content_part.added" in seen
