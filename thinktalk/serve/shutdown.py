"""uvicorn's server, stopping the engine first when it shuts down (SIGINT, SIGTERM, or `should_exit`).

uvicorn's graceful shutdown waits (up to `timeout_graceful_shutdown`) for the open responses to finish before it
tells the app to stop; a streamed reply, or a request in a long prefill, would hold it that long and then be cut.
Stopping the engine worker first ends every request at the scheduler's next iteration with a clean error (503
`server_shutting_down`, or that error as the stream's last event) and frees its caches, so the responses close
and the wait is short.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class EngineServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stop_engine: Callable[[], None]):
        super().__init__(config)
        self.stop_engine = stop_engine  # must not block: it runs on the event loop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stop_engine()
        await super().shutdown(sockets)


def engine_stopper(app) -> Callable[[], None]:
    """The app's engine worker (create_app's) told to stop without waiting for its thread (the lifespan's shutdown
    joins it); nothing for an app without one."""
    def stop() -> None:
        state = getattr(app.state, "server", None)
        if state is not None:
            state.worker.stop(timeout=0)
    return stop
