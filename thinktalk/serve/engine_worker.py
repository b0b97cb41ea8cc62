"""One thread owns the model: it runs the scheduler's loop (`omni.iterate()`), and every request joins that loop.

    job = worker.submit(request, prompt, loop)    from the server's event loop (the prompt prepared off it)
    async for event in job.events ...             Started, TextDelta, AudioChunk, then Done or Failed
    job.cancel()                                  the client went away: its rows and caches are freed at the
                                                  scheduler's next iteration
The scheduler decides what runs each iteration (a chunk of one prompt's prefill between the decode steps of every
running stream, one batched talker step, ...; engine/scheduler.py); the worker only feeds it and sleeps when it
has nothing to do. Admission is bounded: `max_active` requests are in the scheduler at once, at most
`max_queued` more wait here; beyond that `submit` raises QueueFull (the server answers 429).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

from ..events import Done, Failed
from ..omni import Omni
from ..processing.multimodal import PreparedPrompt
from ..requests import GenerationRequest

IDLE_WAIT_SECONDS = 0.5  # the worker wakes at least this often when idle (a cancel needs no wake-up to be safe)


class QueueFull(Exception):
    """The admission queue is full."""


class WorkerStopped(Exception):
    """The worker is not running (the server is shutting down)."""


@dataclass
class _Pending:
    request: GenerationRequest
    prompt: PreparedPrompt
    job: "Job"


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, wake: threading.Condition):
        self.loop, self._wake = loop, wake
        self.events: asyncio.Queue = asyncio.Queue()
        self.stream = None  # the scheduler's Stream, once admitted
        self.ended = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Safe from any thread."""
        self._cancelled.set()
        if self.stream is not None:
            self.stream.cancel()
        with self._wake:
            self._wake.notify()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, item) -> None:
        """Hands an event to the request's queue (on the worker thread); a closed loop drops it."""
        if isinstance(item, (Done, Failed)):
            self.ended = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineWorker:
    def __init__(self, omni: Omni, max_active: int, max_queued: int):
        self.omni, self.max_active, self.max_queued = omni, max_active, max_queued
        self._queued: collections.deque[_Pending] = collections.deque()
        self._running: list[Job] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the server's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thinktalk-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, prompt: PreparedPrompt, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(loop, self._lock)
        with self._lock:
            if self._stopping or self._thread is None:
                raise WorkerStopped("the server is shutting down")
            if len(self._queued) + len(self._running) >= self.max_active + self.max_queued:
                raise QueueFull(f"{len(self._running)} requests running and {len(self._queued)} queued")
            self._queued.append(_Pending(request, prompt, job))
            self._lock.notify()
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels every job (their streams are freed) and ends the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._running), len(self._queued)

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    break
                self._running = [job for job in self._running if not (job.ended or job.cancelled)]
                while self._queued and len(self._running) < self.max_active:
                    self._admit(self._queued.popleft())
                if not self.omni.busy:
                    self._lock.wait(IDLE_WAIT_SECONDS)
                    continue
            self.omni.iterate()
        self._shut_down()

    def _admit(self, pending: _Pending) -> None:
        job = pending.job
        if job.cancelled:
            return
        try:
            job.stream = self.omni.submit(pending.request, job.deliver, pending.prompt)
        except Exception as error:  # noqa: BLE001 (reported on the job: an InputError is a 400, the rest 500)
            job.deliver(Failed(error))
            return
        self._running.append(job)

    def _shut_down(self) -> None:
        with self._lock:
            jobs = [p.job for p in self._queued] + self._running
            self._queued.clear()
            self._running = []
        for job in jobs:
            if job.stream is not None:
                job.stream.cancel()
            if not job.ended:
                job.deliver(Failed(WorkerStopped("the server is shutting down")))
        self.omni.iterate()  # frees the cancelled streams' rows and caches
