"""The outermost layer of every request: one log line (method, path, status, duration), the API key (401) and the
request body's size (413, by Content-Length up front, and by counting the bytes as they arrive: the body is read
here, bounded, and replayed to the app) and its pace (408 when the next piece of the body does not arrive within
`body_read_timeout` seconds: a Content-Length larger than the body sent never holds a connection open)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .schemas import ServerLimits

log = logging.getLogger("thinktalk.serve")
PROTECTED_PREFIX = "/v1/"  # the API; /health, /openapi.json, /docs and the web page are open
# Under the API but open: the page loads the voice names before it can speak to the (key-checked) socket.
OPEN_API_PATHS = frozenset({"/v1/realtime/voices"})


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit} bytes (max_body_bytes)",
                         code="request_too_large")


class BodyTimeout(APIError):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stopped arriving: nothing for {seconds:g} s "
                              "(body_read_timeout_seconds)", code="request_timeout")


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 body_read_timeout: float = ServerLimits.body_read_timeout_seconds):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.body_read_timeout = body_read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await self._send_error(refusal, logged_send)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body = await self._read_body(receive)
                except TimeoutError:
                    await self._send_error(BodyTimeout(self.body_read_timeout), logged_send)
                    return
                if body is None:
                    await self._send_error(BodyTooLarge(self.max_body_bytes), logged_send)
                    return
                receive = _replaying(body, receive)
            await self.app(scope, receive, logged_send)
        finally:
            log.info("%s %s %s %.3fs", scope["method"], scope["path"], status[0] or "-",
                     time.perf_counter() - start)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and path.startswith(PROTECTED_PREFIX) and path not in OPEN_API_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8")):
                return APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, "invalid Content-Length header", code="invalid_request")
            if int(length) > self.max_body_bytes:
                return BodyTooLarge(self.max_body_bytes)
        return None

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is not read); TimeoutError when the next
        piece takes longer than `body_read_timeout`."""
        chunks, size = [], 0
        while True:
            message = await asyncio.wait_for(receive(), self.body_read_timeout)
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _send_error(error: APIError, send: Send) -> None:
        response = error.response()
        await response({"type": "http"}, _no_receive, send)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; then the client's own messages (disconnects)."""
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
