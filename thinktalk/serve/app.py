"""The OpenAI-compatible HTTP server: `create_app(omni, ...)` builds the FastAPI app, `run_server(...)` serves it.

    POST /v1/chat/completions     text, image, audio, video in; text and speech out; SSE streaming; tools
    POST /v1/audio/transcriptions multipart audio -> text (a chat request with Qwen's ASR instruction)
    GET  /v1/models, GET /health, GET /openapi.json
    WS   /v1/realtime and the web page at / (realtime.py), replies on the same engine worker
One worker thread owns the model and runs its scheduler's loop (see engine_worker.py): requests share the thinker's
decode steps and the talker's steps, and a long prompt's prefill runs a chunk at a time between them. Every error is
OpenAI's JSON error shape: a problem with the request (errors.InputError) answers 4xx, anything else is logged with
its traceback and answers 500.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..omni import DEFAULT_MAX_LEN, MOST_PLANNED_ROWS, Omni, check_batching
from .audio_out import supported_formats
from .chat import build_messages, require_model, stream_settings
from .completions import Reply, complete, job_events, prefetched, stream_chunks, submit
from .engine_worker import EngineWorker
from .errors import APIError, ErrorResponse, request_fields, validation_error
from .guard import GuardMiddleware
from .media import MediaPolicy, engine_media_options
from .realtime import WorkerStreamRunner, realtime_router, static_router
from .schemas import ChatCompletion, ChatCompletionRequest, Health, ModelCard, ModelList, ServerLimits
from .shutdown import EngineServer, engine_stopper
from .transcription import add_transcription_route

log = logging.getLogger("thinktalk.serve")
# Conversation prefixes kept across turns: at the released widths a cached token's K/V is 96 KiB, so 1 GiB holds
# about 10,000 tokens of recent conversations.
DEFAULT_PREFIX_CACHE_BYTES = 2**30
# How long SIGINT / SIGTERM waits for open responses: the engine stops first (shutdown.py), so they end at its next
# iteration; this only bounds a client that is slow to read its last bytes.
SHUTDOWN_GRACE_SECONDS = 10
UNBATCHED_ACTIVE = 8  # requests running at once when batching is off (each in a row of its own)
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 500)}
REQUEST_FIELDS = request_fields(ChatCompletionRequest)  # what a validation error's `param` may name


@dataclass
class ServerState:
    omni: Omni
    served_name: str
    worker: EngineWorker
    policy: MediaPolicy
    audio_formats: tuple[str, ...]
    created: int

    @property
    def limits(self) -> ServerLimits:
        return self.policy.limits


def create_app(omni: Omni, served_model_name: str | None = None, api_key: str | None = None,
               allowed_local_media_path: str | Path | None = None, allow_remote_media: bool = False,
               limits: ServerLimits = ServerLimits(), batch_rows: int | None = None,
               batch_max_len: int | None = DEFAULT_MAX_LEN, compile: bool = False,
               prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> FastAPI:
    """`batch_rows`: rows of the thinker's shared decode batch (default: `limits.max_active` when set, else as many
    rows of `batch_max_len` slots as free memory holds, at most MOST_PLANNED_ROWS; 0 turns batching off); the
    scheduler runs as many requests at once as it has rows (`limits.max_active` when set); `batch_max_len`: cache slots per row (prompt + reply; None: what
    the GPU's free memory holds, from the memory planner); `compile`:
    compile the shared decode step (once, on the first step); `prefix_cache_bytes`: how much of finished
    conversations' K/V the scheduler keeps, so that a next turn (a chat request extending the previous one, the
    Realtime socket's next reply) prefills only its new tokens (0: none)."""
    rows = batch_rows if batch_rows is not None else limits.max_active
    if rows is None:
        rows = omni.planned_rows(batch_max_len or DEFAULT_MAX_LEN)
        log.info("batch rows: %d (what free memory holds at %d slots each, at most %d)", rows,
                 batch_max_len or DEFAULT_MAX_LEN, MOST_PLANNED_ROWS)
    omni.enable_scheduler(rows, batch_max_len, compile, prefix_cache_bytes=prefix_cache_bytes)
    omni.media = engine_media_options(omni.media, limits)
    omni.max_model_len = limits.model_len(omni.cfg.thinker.text.max_position_embeddings)
    local = Path(allowed_local_media_path).expanduser().resolve(strict=True) if allowed_local_media_path else None
    if local is not None and not local.is_dir():
        raise NotADirectoryError(f"--allowed-local-media-path {local}: not a folder")
    sample_rate = omni.sample_rate
    state = ServerState(
        omni=omni, served_name=served_model_name or omni.path.name,
        worker=EngineWorker(omni, limits.max_active or rows or UNBATCHED_ACTIVE, limits.max_queued),
        policy=MediaPolicy(limits, local, allow_remote_media),
        audio_formats=supported_formats(sample_rate), created=int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        log.info("serving %s (%s)", state.served_name, omni.path)
        yield
        state.worker.stop()  # in-flight generators are closed; waiting requests get 503

    app = FastAPI(title="thinktalk", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for Qwen3-Omni models (thinktalk)")
    app.state.server = state
    _add_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       body_read_timeout=limits.body_read_timeout_seconds)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        active, queued = state.worker.counts
        return Health(model=state.served_name, active_requests=active, queued_requests=queued)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.served_name, created=state.created)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def model(model_id: str) -> ModelCard:
        require_model(model_id, state.served_name)
        return ModelCard(id=state.served_name, created=state.created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        require_model(body.model, state.served_name)
        settings = stream_settings(body, omni.voices, omni.model.talker is not None, state.audio_formats,
                                   state.limits)
        messages = await run_in_threadpool(build_messages, body, state.policy)
        job = await submit(state.worker, omni, messages, settings, state.limits)
        events = await prefetched(job_events(job, request))
        reply = Reply(settings, sample_rate, tokenizer=omni.tokenizer)
        if not body.stream:
            return await complete(events, reply, state.served_name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_chunks(events, reply, state.served_name, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    add_transcription_route(app, state, ERROR_RESPONSES)
    app.include_router(realtime_router(omni, runner=WorkerStreamRunner(state.worker), api_key=api_key,
                                       model_name=state.served_name))
    app.include_router(static_router())
    _add_favicon(app)
    return app


FAVICON = Path(__file__).parent / "static" / "favicon.svg"  # the page's icon, a small SVG
FAVICON_MAX_AGE = 86400  # seconds a browser may keep it


def _add_favicon(app: FastAPI) -> None:
    """The page links /favicon.svg; browsers also ask for /favicon.ico on their own: both answer the SVG."""
    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml",
                            headers={"Cache-Control": f"max-age={FAVICON_MAX_AGE}"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error.errors(), REQUEST_FIELDS).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return APIError(error.status_code, str(error.detail)[:500], code=codes.get(error.status_code),
                        headers=dict(error.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.error("unhandled error: %r", error, exc_info=error)
        return APIError(500, "internal server error", code="internal_error").response()


class TlsFileError(InputError):
    """--ssl-certfile / --ssl-keyfile name a file that is missing, unreadable, or not a certificate and its key."""


def check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    """Before the model loads: the certificate (PEM, with its key unless `keyfile` is given) and the key must be
    readable and belong together, so a bad path is one clear error, not a failure after startup."""
    if certfile is None:
        if keyfile is not None:
            raise TlsFileError("--ssl-keyfile needs --ssl-certfile (the certificate it belongs to)")
        return
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is None:
            continue
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            raise TlsFileError(f"{option} {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a PEM certificate and its "
                           f"private key ({exc})") from exc


def run_server(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
               served_model_name: str | None = None, api_key: str | None = None,
               allowed_local_media_path: str | None = None, allow_remote_media: bool = False,
               dtype: str | None = None, limits: ServerLimits = ServerLimits(), batch_rows: int | None = None,
               batch_max_len: int | None = None, compile: bool = False, quantize: str | None = None,
               prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, ssl_certfile: str | None = None,
               ssl_keyfile: str | None = None) -> None:
    """Loads the model (default: the built-in demo checkpoint; `quantize`: int8/int4/fp8 on load) and serves it
    until SIGINT / SIGTERM; with `ssl_certfile` (and `ssl_keyfile`) over https / wss."""
    import uvicorn

    check_tls_files(ssl_certfile, ssl_keyfile)

    if batch_rows:  # bad values fail before the (possibly long) load
        check_batching(batch_rows, batch_max_len or DEFAULT_MAX_LEN)

    from ..demo import ensure_demo_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    omni = Omni.from_pretrained(model if model is not None else ensure_demo_checkpoint(), device=device, dtype=dtype,
                                quantize=quantize)
    app = create_app(omni, served_model_name, api_key, allowed_local_media_path, allow_remote_media, limits,
                     batch_rows, batch_max_len, compile, prefix_cache_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, ssl_certfile=ssl_certfile,
                            ssl_keyfile=ssl_keyfile)
    EngineServer(config, engine_stopper(app)).run()
