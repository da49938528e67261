"""A bounded priority queue per model version, with dynamic batching, shared by its instances.

Instances' worker threads block in `next_batch`; the asyncio side calls `submit` and `remove`.
One lock guards everything, so a request is taken by exactly one instance or removed (timed out,
cancelled) exactly once. Priority level 1 is the highest; within a level, first come first served.

The scheduler also times the batches its instances run, so that a drain or an unload with a deadline
does not start what it would have to stop (`finish_by`), nor an instance a request whose own deadline
would pass before even the fastest of the latest runs could end (its caller's time and the device's
would both be spent for nothing), and so that Accepted can say when a request should start and end.
"""
from __future__ import annotations

import collections
import heapq
import statistics
import threading
import time
from typing import Callable, Iterable, Optional

from ..domain import ResolvedParams
from ..errors import DeadlineUnreachable, NotReady, NotStarted, QueueFull, QueueTimeout
from .model_config import Batching
from .request import EngineRequest, RequestPhase

#: How many of the latest batches a request's run-time estimate is drawn from (their median).
DURATION_SAMPLES = 16


def work_units(params: ResolvedParams) -> float:
    """A request's work, the unit run times are estimated in: pixels x frames x (UNet passes + 1), one
    pass per denoising step and guidance row, the one more standing for image encode and VAE decode.
    Exact for the shape the model mostly serves (its time per unit is measured), proportional for others."""
    passes = params.num_inference_steps * (2 if params.guided else 1)
    return float(params.width * params.height * params.num_frames * (passes + 1))


class Scheduler:
    def __init__(self, *, batching: Batching, max_batch_size: int,
                 on_depth: Callable[[int], None] = lambda n: None,
                 live_instances: Callable[[], int] = lambda: 1) -> None:
        self._batching = batching
        self._live_instances = live_instances  # instances taking work now (the estimates' servers)
        self._max_batch = max_batch_size if batching.enabled else 1
        self._levels = [collections.deque() for _ in range(batching.priority_levels)]
        self._cv = threading.Condition()
        self._closed = False
        self.on_depth = on_depth  # called with the queue depth after each change (a retiring runtime drops it)
        # batches instances are gathering (their first request's batch_key, the batch, its room): a
        # request that fits one is left for that instance, not taken by an idle one as a batch of its own
        self._gathering: list[tuple[tuple, list[EngineRequest], int]] = []
        # batches the instances are running: id(batch) -> (started, batch); and the seconds per work unit
        # of the latest batches that ran to their end (the run-time estimate)
        self._running: dict[int, tuple[float, list[EngineRequest]]] = {}
        self._seconds_per_unit: collections.deque[float] = collections.deque(maxlen=DURATION_SAMPLES)
        self._finish_by: Optional[float] = None  # time.monotonic(): nothing starts that would end later
        self._finish_why = ""

    @property
    def max_queue_size(self) -> int:
        return self._batching.queue_policy.max_queue_size

    def depth(self) -> int:
        with self._cv:
            return self._queued()

    def _queued(self) -> int:
        """Requests waiting at every priority level (call with the lock held)."""
        return sum(len(q) for q in self._levels)

    def submit(self, req: EngineRequest) -> tuple[int, Optional[tuple[float, float]]]:
        """Queue a request; returns how many queued requests are ahead of it, and the estimated seconds
        from now until an instance starts it and until it ends (None before any batch was timed)."""
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
            return ahead, self._eta(req, time.monotonic())

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

    def finish_by(self, deadline: float, why: str, now: Optional[float] = None) -> int:
        """A drain's or an unload's end: from now on no instance starts a request it would not finish by
        `deadline` (time.monotonic()), and the queued requests that would not are handed back at once,
        marked not started (the SDK sends them to another server while there is time, where they would
        have waited out the deadline and then been handed back, or started and been stopped, their work
        lost). Which ones: the queue in the order instances take it, over the live instances, each free
        when its batch's estimated end comes, each request's run time estimated from the latest batches;
        nothing is handed back before a batch has run to its end (no estimate). `why`: what ends then,
        for the callers' message ("the server's drain"). Returns how many."""
        with self._cv:
            now = time.monotonic() if now is None else now
            self._finish_by, self._finish_why = deadline, why
            free = self._instances_free(now)
            if not free:
                return 0
            back = 0
            for q in self._levels:
                for req in list(q):
                    if req.is_cancelled():
                        continue
                    start = heapq.heappop(free)
                    end = start + self._estimate([req.params])
                    if end > deadline:
                        q.remove(req)
                        self._hand_back(req)
                        back += 1
                        end = start  # that instance is still free then for a shorter request behind
                    heapq.heappush(free, end)
            if back:
                self.on_depth(self._queued())
            return back

    def _instances_free(self, now: float) -> list[float]:
        """When each live instance is free, by the estimates: a heap, empty when nothing is timed yet."""
        if not self._seconds_per_unit:
            return []
        free = [max(now, started + self._estimate(r.params for r in batch)) for started, batch in self._running.values()]
        free += [now] * max(0, self._live_instances() - len(free))
        heapq.heapify(free)
        return free

    def _eta(self, req: EngineRequest, now: float) -> Optional[tuple[float, float]]:
        """Seconds from `now` until an instance would start `req` (queued) and until it would end, the
        requests ahead of it run first on the instance free first (call with the lock held)."""
        free = self._instances_free(now)
        if not free:
            return None
        for q in self._levels[: req.priority]:
            for other in q:
                if other.is_cancelled():
                    continue
                start = heapq.heappop(free)
                end = start + self._estimate([other.params])
                if other is req:
                    return start - now, end - now
                heapq.heappush(free, end)
        return None

    def _estimate(self, rows: Iterable[ResolvedParams]) -> float:
        """Seconds an instance would take to run these rows as one batch (call with the lock held and a
        sample taken): their work times the median seconds per unit of the latest batches."""
        return statistics.median(self._seconds_per_unit) * sum(work_units(p) for p in rows)

    def _fastest(self, params: ResolvedParams) -> Optional[float]:
        """Seconds the request would take at the fastest of the latest batches' rates (None: none timed)."""
        return min(self._seconds_per_unit) * work_units(params) if self._seconds_per_unit else None

    def _cannot_finish(self, rows: Iterable[ResolvedParams], start: float) -> bool:
        return self._finish_by is not None and bool(self._seconds_per_unit) and (
            start + self._estimate(rows) > self._finish_by)

    def _hand_back(self, req: EngineRequest) -> None:
        req.error(NotStarted(f"{self._finish_why} ends before this request would, by the run time of the "
                             f"latest requests; nothing was done for it: send it again"))
        req.close()

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
                if self._cannot_finish([req.params], now):
                    q.remove(req)
                    self._hand_back(req)
                    continue
                fastest = self._fastest(req.params)
                if req.deadline is not None and fastest is not None and now + fastest > req.deadline:
                    q.remove(req)
                    req.error(DeadlineUnreachable(
                        f"the request's deadline is {max(0.0, req.deadline - now):.1f}s away and the fastest of "
                        f"the latest runs would take {fastest:.1f}s; not started"))
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
                        req.queue_deadline is None or now < req.queue_deadline) and not self._cannot_finish(
                        [r.params for r in batch] + [req.params], now):
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
            self._running[id(batch)] = (started, batch)
            self.on_depth(self._queued())
            return batch

    def batch_done(self, batch: list[EngineRequest], seconds: float, *, ran_to_end: bool) -> None:
        """An instance is done with `batch` (from `next_batch`) after `seconds`. One that ran every row to
        its end (no error, none cancelled) is a sample of the model's run time."""
        with self._cv:
            self._running.pop(id(batch), None)
            if ran_to_end:
                self._seconds_per_unit.append(seconds / sum(work_units(r.params) for r in batch))
