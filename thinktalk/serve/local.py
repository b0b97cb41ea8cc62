"""A server on loopback in a background thread (for tests and benchmarks): `with BackgroundServer(app) as url:`.
It is the server `thinktalk serve` runs (shutdown.py's EngineServer): leaving the block shuts it down as SIGINT
does."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from .shutdown import EngineServer, engine_stopper


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class BackgroundServer:
    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", timeout_graceful_shutdown=5)
        self.server = EngineServer(config, engine_stopper(app))
        self.thread = threading.Thread(target=self.server.run, name="thinktalk-test-server", daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
