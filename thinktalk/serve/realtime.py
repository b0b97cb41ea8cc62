"""`WS /v1/realtime`: OpenAI's Realtime protocol (GA event names) over one Omni model.

    client: session.update, input_audio_buffer.append/commit/clear, conversation.item.create/delete,
            response.create/cancel
    server: session.created/updated, input_audio_buffer.speech_started/speech_stopped/committed/cleared,
            conversation.item.created/deleted, response.created, response.output_item.added/done,
            response.content_part.added/done, response.output_text.delta/done, response.output_audio.delta/done,
            response.output_audio_transcript.delta/done, response.done, error (naming the offending event)

Audio in and out is base64 PCM16 mono at 24 kHz; input audio is resampled to the model's 16 kHz. With `server_vad`
turn detection (see vad.py) a stop in speech commits the turn and starts a reply; speech during a reply cancels it
(barge-in). The conversation (user items, assistant replies as text) lives as long as the socket. Generation runs
off the event loop through a `StreamRunner` (default: a thread per reply, one reply at a time per model), checked
for cancellation between events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from importlib import resources
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket
from fastapi.responses import FileResponse

from ..events import Done, Failed
from ..requests import GenerationRequest
from .engine_worker import QueueFull, WorkerStopped
from .realtime_events import SessionState
from .realtime_session import Cancel, RealtimeSession, StreamRunner, log
from .vad import DETECTORS, silero_loader

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
KEY_PROTOCOL = "openai-insecure-api-key."
DEMO_CONFIG = "assets/demo_config.json"  # the demo checkpoint's config.json, as thinktalk/demo.py writes it


async def next_or_cancel(queue: asyncio.Queue, cancel: Cancel) -> tuple[bool, object]:
    """(True, item) for the queue's next item, (False, None) as soon as `cancel` is set."""
    if cancel.is_set():
        return False, None
    getter, waiter = asyncio.ensure_future(queue.get()), asyncio.ensure_future(cancel.wait())
    done, pending = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if getter in done and not cancel.is_set():
        return True, getter.result()
    return False, None


class ThreadStreamRunner:
    """One thread per reply, running `omni.stream` (a scheduler of its own); a lock keeps the model to one reply at a
    time (the others wait their turn)."""

    def __init__(self, omni) -> None:
        self.omni = omni
        self._model_lock = threading.Lock()

    async def stream(self, request: GenerationRequest, cancel: Cancel) -> AsyncIterator:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        end = object()

        def deliver(item: object) -> None:
            if not loop.is_closed():  # a cancelled reply's thread may outlive the session's loop
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            outcome: object = end
            with self._model_lock:
                try:
                    if not cancel.is_set():
                        events = self.omni.stream(request)
                        try:
                            for event in events:
                                if cancel.is_set():
                                    break
                                deliver(event)
                        finally:
                            events.close()
                except Exception as exc:  # handed to the awaiting coroutine, which raises it
                    outcome = exc
            deliver(outcome)

        threading.Thread(target=work, name="realtime-reply", daemon=True).start()
        ended = False
        try:
            while True:
                more, item = await next_or_cancel(queue, cancel)
                if not more or item is end:
                    ended = True
                    return
                if isinstance(item, Exception):
                    ended = True
                    raise item
                yield item
        finally:
            if not ended:  # the consumer left early (its socket is gone): the thread stops at its next event
                cancel.set()


class WorkerStreamRunner:
    """Replies on the HTTP server's engine worker (engine_worker.EngineWorker), in the same scheduler as its
    requests; the prompt is prepared off the event loop first."""

    def __init__(self, worker) -> None:
        self.worker = worker

    async def stream(self, request: GenerationRequest, cancel: Cancel) -> AsyncIterator:
        omni = self.worker.omni
        prompt = await asyncio.to_thread(omni.prepare, request.messages, request.use_audio_in_video, request.tools)
        try:
            job = self.worker.submit(request, prompt, asyncio.get_running_loop())
        except (QueueFull, WorkerStopped) as exc:
            raise RuntimeError(f"the engine cannot take this reply now: {exc}") from exc
        try:
            while True:
                more, item = await next_or_cancel(job.events, cancel)
                if not more:
                    return
                if isinstance(item, Failed):
                    raise item.error
                yield item
                if isinstance(item, Done):
                    return
        finally:
            job.cancel()  # a no-op once finished; otherwise the scheduler frees the stream at its next iteration


def _authorized(websocket: WebSocket, offered: list[str], api_key: str) -> bool:
    """`Authorization: Bearer KEY`, or (browsers cannot set headers) the subprotocol `openai-insecure-api-key.KEY`."""
    header = websocket.headers.get("authorization", "")
    given = [header[7:].strip()] if header[:7].lower() == "bearer " else []
    given += [p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)]
    return any(hmac.compare_digest(key.encode("utf-8", "replace"), api_key.encode("utf-8")) for key in given)


def is_demo_checkpoint(path: Path) -> bool:
    """Whether `path` holds the built-in demo checkpoint (random weights): its config.json is the demo's own."""
    demo = json.loads(resources.files("thinktalk").joinpath(DEMO_CONFIG).read_text())
    try:
        return json.loads((Path(path) / "config.json").read_text()) == demo
    except (OSError, ValueError):  # no readable config: not the demo (the model loaded from elsewhere)
        return False


def realtime_router(omni, runner: StreamRunner | None = None, defaults: dict[str, Any] | None = None,
                    api_key: str | None = None, model_name: str | None = None,
                    vad: str = "silero") -> APIRouter:
    """`WS /v1/realtime` and `GET /v1/realtime/voices` over `omni`. `runner` runs replies off the event loop (the
    HTTP server's worker through WorkerStreamRunner, or by default a thread per reply); `defaults` seed every
    session (SessionState fields, e.g. {"max_output_tokens": 64, "talker_max_new_tokens": 24}); with `api_key` the
    socket is refused (close code 1008) without it; `model_name`: the served name (default: the checkpoint
    folder's), given as `session.model` and to the page; `vad`: server VAD's detector, "silero" (the energy
    detector when silero-vad is not installed) or "energy" (vad.py)."""
    runner = runner or ThreadStreamRunner(omni)
    model_name = model_name or omni.path.name
    base = SessionState(model=model_name, voice=omni.default_voice if omni.voices else "", **(defaults or {}))
    router = APIRouter()

    random_weights = is_demo_checkpoint(omni.path)
    if vad not in DETECTORS:
        raise ValueError(f"unknown VAD detector {vad!r}; choose one of {', '.join(DETECTORS)}")
    if vad == "silero" and silero_loader() is not None:  # without silero-vad, the loader has logged the fallback
        log.info("server VAD: Silero (silero-vad)")

    @router.get("/v1/realtime/voices")
    def voices() -> dict:
        """What the page shows before it connects: the voices, the served model, and whether it is the demo."""
        return {"voices": omni.voices, "default": base.voice or None, "model": model_name,
                "random_weights": random_weights}

    @router.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if api_key is not None and not _authorized(websocket, offered, api_key):
            await websocket.close(code=1008, reason="missing or invalid API key")
            return
        await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
        await RealtimeSession(websocket, omni, runner, base, vad).run()

    return router


def static_router() -> APIRouter:
    """The web page: `GET /` and its two assets under `/static/` (only the files the page is made of)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type=PAGE_FILES["index.html"])

    @router.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})

    return router
