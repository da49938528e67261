"""One admitted request: the bridge between the asyncio side and an instance's worker thread."""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
import time
from typing import Any, Optional

from PIL import Image

from ..backends.base import Finished
from ..domain import ResolvedParams
from ..errors import DeadlinePassed, QueueTimeout


class RequestPhase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclasses.dataclass(frozen=True)
class _Failed:
    exc: BaseException


class _Closed:
    """The instance is done with the request (sent after execute returns)."""


CLOSED = _Closed()


class EngineRequest:
    """Queued or running work. Implements the backend's ResponseSender for its worker thread."""

    def __init__(self, *, request_id: str, model: str, version: int, params: ResolvedParams, image: Image.Image,
                 priority: int, queue_deadline: Optional[float], loop: asyncio.AbstractEventLoop,
                 prepared: Any = None, deadline: Optional[float] = None) -> None:
        self.request_id = request_id
        self.model = model
        self.version = version
        self.params = params
        self.image = image
        self.prepared = prepared  # the backend's CPU preprocessing, done at admission
        self.priority = priority  # 1 = highest
        self.queue_deadline = queue_deadline  # time.monotonic() by which an instance must take it
        self.deadline = deadline  # time.monotonic() by which the caller wants it done (its gRPC deadline)
        self.enqueued_at = time.monotonic()
        self.started_at: Optional[float] = None
        self.phase = RequestPhase.QUEUED
        self.batch_size = 1
        self.instance = ""
        self.ran_whole = False  # the backend finished it in the batch it was handed out in
        self.run: Any = None  # its batch's run (scheduler.BatchRun) from the instance taking it to its end
        # why the server itself ended it (the drain's end, an unload), once it has: a stream gRPC then
        # cancels (its frames still waiting on a slow reader) ended for this, not by its caller
        self.ended_by_server: Optional[BaseException] = None
        self._loop = loop
        self.events: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()  # (sent at, event)
        self._cancelled = threading.Event()
        self.last_sent = 0.0  # time.monotonic() of the last event its instance sent (or progressed())
        self.finished = False  # its instance sent its result (Finished)

    # -- ResponseSender (worker thread) --
    # Each event is queued with the time.monotonic() it was sent at: the end of the phase it reports
    # (the loop may read it later, e.g. while frames of the chunk before still encode).
    def send(self, event: Any) -> None:
        self.last_sent = now = time.monotonic()  # a sign of progress (the stall watchdog), cancelled or not
        if isinstance(event, Finished):
            self.finished = True
        if not self._cancelled.is_set():
            self._loop.call_soon_threadsafe(self.events.put_nowait, (now, event))

    def progressed(self) -> None:
        self.last_sent = time.monotonic()

    def error(self, exc: BaseException) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, (time.monotonic(), _Failed(exc)))

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- engine side --
    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        self.phase = RequestPhase.DONE
        self._loop.call_soon_threadsafe(self.events.put_nowait, (time.monotonic(), CLOSED))

    def queue_expired(self) -> QueueTimeout:
        """Why it ends when its queue deadline passes before an instance takes it: the caller's own
        deadline where that is the earlier (the queue deadline is the earlier of the two), else the
        model's queue timeout."""
        if self.deadline is not None and self.queue_deadline is not None and self.queue_deadline >= self.deadline:
            return DeadlinePassed("the caller's deadline passed before an instance was free")
        return QueueTimeout("queue timeout passed before an instance was free")

    @property
    def queue_wait(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at
