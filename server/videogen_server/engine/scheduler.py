"""A bounded priority queue per model version, with dynamic batching, shared by its instances.

Instances' worker threads block in `next_batch`; the asyncio side calls `submit` and `remove`.
One lock guards everything, so a request is taken by exactly one instance or removed (timed out,
cancelled) exactly once. Priority level 1 is the highest; within a level, first come first served.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Optional

from ..errors import NotReady, QueueFull, QueueTimeout
from .model_config import Batching
from .request import EngineRequest, RequestPhase


class Scheduler:
    def __init__(self, *, batching: Batching, max_batch_size: int,
                 on_depth: Callable[[int], None] = lambda n: None) -> None:
        self._batching = batching
        self._max_batch = max_batch_size if batching.enabled else 1
        self._levels = [collections.deque() for _ in range(batching.priority_levels)]
        self._cv = threading.Condition()
        self._closed = False
        self.on_depth = on_depth  # called with the queue depth after each change (a retiring runtime drops it)
        # batches instances are gathering (their first request's batch_key, the batch, its room): a
        # request that fits one is left for that instance, not taken by an idle one as a batch of its own
        self._gathering: list[tuple[tuple, list[EngineRequest], int]] = []

    @property
    def max_queue_size(self) -> int:
        return self._batching.queue_policy.max_queue_size

    def depth(self) -> int:
        with self._cv:
            return self._queued()

    def _queued(self) -> int:
        """Requests waiting at every priority level (call with the lock held)."""
        return sum(len(q) for q in self._levels)

    def submit(self, req: EngineRequest) -> int:
        """Queue a request; returns how many queued requests are ahead of it."""
        with self._cv:
            if self._closed:
                raise NotReady(f"model {req.model!r} is unloading")
            depth = self._queued()
            if depth >= self.max_queue_size:
                raise QueueFull(f"model {req.model!r} queue is full ({self.max_queue_size} waiting); retry later")
            ahead = sum(len(q) for q in self._levels[: req.priority])
            self._levels[req.priority - 1].append(req)
            self.on_depth(depth + 1)
            # notify_all: a single wake-up could land on an instance that is gathering a batch of
            # another shape and ignores this request, while an idle instance sleeps on.
            self._cv.notify_all()
            return ahead

    def remove(self, req: EngineRequest) -> bool:
        """Take a still-queued request out (cancelled or timed out); False if an instance has it."""
        with self._cv:
            try:
                self._levels[req.priority - 1].remove(req)
            except ValueError:
                return False
            self.on_depth(self._queued())
            return True

    def close(self) -> list[EngineRequest]:
        """Stop handing out work; wakes every waiting instance. Returns what was still queued."""
        with self._cv:
            self._closed = True
            left = [r for q in self._levels for r in q]
            for q in self._levels:
                q.clear()
            self.on_depth(0)
            self._cv.notify_all()
            return left

    # -- worker side ------------------------------------------------------------------------------

    def _pop_head(self, now: float) -> Optional[EngineRequest]:
        """The first request in priority order that no instance is gathering a batch for; drops the
        cancelled and times out the expired on the way."""
        for q in self._levels:
            for req in list(q):
                if req.is_cancelled():
                    q.remove(req)
                    continue
                if req.queue_deadline is not None and now >= req.queue_deadline:
                    q.remove(req)
                    req.error(QueueTimeout("queue timeout passed before an instance was free"))
                    req.close()
                    continue
                if any(key == req.params.batch_key and len(batch) < room for key, batch, room in self._gathering):
                    continue  # the gathering instance takes it when it wakes (notify_all in submit)
                q.remove(req)
                return req
        return None

    def _take_compatible(self, batch: list[EngineRequest], now: float) -> None:
        key = batch[0].params.batch_key
        for q in self._levels:
            for req in list(q):
                if len(batch) >= self._max_batch:
                    return
                if req.params.batch_key == key and not req.is_cancelled() and (
                        req.queue_deadline is None or now < req.queue_deadline):
                    q.remove(req)
                    batch.append(req)

    def _next_wakeup(self) -> Optional[float]:
        deadlines = [r.queue_deadline for q in self._levels for r in q if r.queue_deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def next_batch(self) -> Optional[list[EngineRequest]]:
        """Block until there is work; None once closed. Batches requests of equal shape."""
        with self._cv:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                head = self._pop_head(now)
                if head is not None:
                    break
                self.on_depth(self._queued())  # 0, or requests left to gathering instances
                self._cv.wait(timeout=self._next_wakeup())
            batch = [head]
            if self._max_batch > 1:
                self._take_compatible(batch, now)
                target = max(self._batching.preferred_batch_sizes or (self._max_batch,))
                room = min(target, self._max_batch)
                until = head.enqueued_at + self._batching.max_queue_delay_s
                gathering = (head.params.batch_key, batch, room)
                self._gathering.append(gathering)
                try:
                    while len(batch) < room and not self._closed:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(timeout=left)
                        self._take_compatible(batch, time.monotonic())
                finally:
                    self._gathering.remove(gathering)
                    self._cv.notify_all()  # requests left for this batch (it filled up) are anyone's again
            started = time.monotonic()
            for req in batch:
                req.phase = RequestPhase.RUNNING
                req.started_at = started
                req.batch_size = len(batch)
            self.on_depth(self._queued())
            return batch
