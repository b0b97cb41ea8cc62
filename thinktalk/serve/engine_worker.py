"""One thread owns the model and interleaves requests.

Each request is a generator (an `Omni.stream(...)`), created on the worker thread by the request's factory. The
worker advances the active generators round-robin, one event each per turn, and hands every event to the
request's asyncio queue on the server's event loop. With the thinker's shared decode batch enabled (the server's
default), the first request of a turn that needs a token runs one decode step for every running request, and the
others find theirs waiting. Admission is bounded: `max_active` generators run, at most
`max_queued` more wait; beyond that `submit` raises `QueueFull` (the server answers 429). Cancelling a job (the
client went away, or the server stops) closes its generator on the worker thread, which frees its caches.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("thinktalk.serve")


class QueueFull(Exception):
    """The admission queue is full."""


class WorkerStopped(Exception):
    """The worker is not running (the server is shutting down)."""


@dataclass(frozen=True)
class Finished:
    """The generator ran to its end."""


@dataclass(frozen=True)
class Failed:
    """The generator raised; `error` is the exception (the worker logged it when unexpected)."""

    error: BaseException


class Job:
    def __init__(self, factory: Callable[[], Iterator], loop: asyncio.AbstractEventLoop):
        self.factory, self.loop = factory, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.generator: Iterator | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Safe from any thread; the worker closes the generator at its next turn."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, item) -> bool:
        """Hands an item to the request's queue; False when the event loop is gone."""
        if self.loop.is_closed():
            return False
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        return True


class EngineWorker:
    def __init__(self, max_active: int, max_queued: int, expected_errors: tuple[type[BaseException], ...] = ()):
        self.max_active, self.max_queued = max_active, max_queued
        self.expected_errors = expected_errors  # input errors: reported to the client, not logged as failures
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the server's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thinktalk-engine", daemon=True)
        self._thread.start()

    def submit(self, factory: Callable[[], Iterator], loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(factory, loop)
        with self._lock:
            if self._stopping or self._thread is None:
                raise WorkerStopped("the server is shutting down")
            if len(self._waiting) + len(self._active) >= self.max_active + self.max_queued:
                raise QueueFull(f"{len(self._active)} requests running and {len(self._waiting)} queued")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels every job (their generators are closed) and ends the thread."""
        with self._lock:
            self._stopping = True
            for job in list(self._waiting) + self._active:
                job.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._active), len(self._waiting)

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._active and not self._waiting:
                    self._lock.wait()
                if self._stopping:
                    jobs = list(self._waiting) + self._active
                    self._waiting.clear()
                    self._active.clear()
                    break
                while self._waiting and len(self._active) < self.max_active:
                    self._active.append(self._waiting.popleft())
                turn = list(self._active)
            finished = [job for job in turn if not self._advance(job)]
            if finished:
                with self._lock:
                    self._active = [job for job in self._active if job not in finished]
        for job in jobs:
            self._close(job)
            job.deliver(Failed(WorkerStopped("the server is shutting down")))

    def _advance(self, job: Job) -> bool:
        """One event of `job`; False once the job is over (finished, failed or cancelled)."""
        if job.cancelled:
            self._close(job)
            return False
        try:
            if job.generator is None:
                job.generator = job.factory()
            event = next(job.generator)
        except StopIteration:
            job.deliver(Finished())
            return False
        except self.expected_errors as error:  # the request's own fault: reported to the client as a 400
            self._close(job)
            job.deliver(Failed(error))
            return False
        except Exception as error:  # reported to the client as a generic 500; the traceback stays in the log
            log.exception("request failed inside the engine")
            self._close(job)
            job.deliver(Failed(error))
            return False
        if not job.deliver(event):
            self._close(job)
            return False
        return True

    @staticmethod
    def _close(job: Job) -> None:
        if job.generator is not None:
            job.generator.close()
            job.generator = None
