"""A bounded priority queue per model version, with dynamic batching, shared by its instances.

Instances' worker threads block in `next_batch`; the asyncio side calls `submit` and `remove`.
One lock guards everything, so a request is taken by exactly one instance or removed (timed out,
cancelled) exactly once. Priority level 1 is the highest; within a level, first come first served.

The scheduler also times the batches its instances run (`run_times`), so that a drain or an unload
with a deadline does not start what it would have to stop (`finish_by`), nor an instance a request
whose own deadline would pass before even the fastest of its shape's latest runs alone could end
(its caller's time and the device's would both be spent for nothing), and so that Accepted can say
when a request should start and end (`_plan`: the queue as the instances would take it).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import threading
import time
from typing import Callable, Optional

from ..errors import DeadlineUnreachable, NotReady, NotStarted, QueueFull, VideoGenError
from .model_config import Batching
from .request import EngineRequest, RequestPhase
from .run_times import BatchRun, RunTimes


#: A batch gathering rows starts this long before the earliest queue timeout among them, so that none
#: passes while it waits in the batch (where the engine's queue timer no longer reaches it).
QUEUE_TIMEOUT_MARGIN_S = 0.05

#: (start, end) seconds from now, each None where not known
Eta = tuple[Optional[float], Optional[float]]


@dataclasses.dataclass(eq=False)
class _Gathering:
    """A batch an instance is gathering: its first request's batch_key, its rows, its room, and when the
    gathering ends at the latest (time.monotonic())."""

    key: tuple
    rows: list
    room: int
    until: float
    fastest: Optional[float] = None  # the shape's fastest recent run alone (RunTimes.fastest), if known

    def end_before_queue_timeouts(self) -> None:
        """Moves `until` early enough that no row's queue timeout passes while it waits in the batch
        (where the engine's queue timer cannot take it out), nor its deadline comes too close for even
        the shape's fastest run (the instance would refuse it at the start: waiting made it miss)."""
        self.until = self._until(self.rows)

    def _until(self, rows: list) -> float:
        ends = [self.until] + [r.queue_deadline - QUEUE_TIMEOUT_MARGIN_S for r in rows
                               if r.queue_deadline is not None]
        if self.fastest is not None:
            ends += [r.deadline - self.fastest - QUEUE_TIMEOUT_MARGIN_S for r in rows if r.deadline is not None]
        return min(ends)

    def start(self, now: float, joiners: list = ()) -> float:
        """When the batch starts at the latest (time.monotonic()), with `joiners` taken in too: at once
        once it has its room, else when its gathering ends (before the joiners' queue timeouts too)."""
        if len(self.rows) + len(joiners) >= self.room:
            return now
        return max(now, self._until(joiners))


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
        self.on_depth = on_depth  # called with the queue depth after each change, with the lock held
        # batches instances are gathering: a request that fits one is left for that instance, not taken
        # by an idle one as a batch of its own
        self._gathering: list[_Gathering] = []
        # batches whose instance runs them: id(batch) -> run (each request of it also holds its run until
        # it ends); the run times of those that ran whole, per shape and size
        self._running: dict[int, BatchRun] = {}
        self.run_times = RunTimes()
        self._finish_by: Optional[float] = None  # time.monotonic(): nothing starts that would end later
        self._finish_why = ""

    @property
    def max_batch(self) -> int:
        """The most requests a batch takes (1 without dynamic batching)."""
        return self._max_batch

    @property
    def max_queue_size(self) -> int:
        return self._batching.queue_policy.max_queue_size

    def depth(self) -> int:
        with self._cv:
            return self._queued()

    def report_depth(self) -> None:
        """Calls on_depth with the depth now (under the lock, as every change does: no older value can
        land after a newer one)."""
        with self._cv:
            self._report_depth()

    def _queued(self) -> int:
        """Requests waiting at every priority level (call with the lock held)."""
        return sum(len(q) for q in self._levels)

    def _report_depth(self) -> None:
        """on_depth with every request waiting to start: queued, or in a batch an instance is gathering
        (it waits out max_queue_delay there). Call with the lock held."""
        self.on_depth(self._queued() + sum(len(g.rows) for g in self._gathering))

    def submit(self, req: EngineRequest) -> tuple[int, Eta]:
        """Queue a request; returns how many queued requests are ahead of it, and the estimated seconds
        from now until an instance starts it and until it ends (each None where not known)."""
        with self._cv:
            if self._closed:
                raise NotReady(f"model {req.model!r} is unloading")
            depth = self._queued()
            if depth >= self.max_queue_size:
                raise QueueFull(f"model {req.model!r} queue is full ({self.max_queue_size} waiting); retry later",
                                retry_after=self._retry_after())
            ahead = sum(len(q) for q in self._levels[: req.priority])
            self._levels[req.priority - 1].append(req)
            self._report_depth()
            # notify_all: a single wake-up could land on an instance that is gathering a batch of
            # another shape and ignores this request, while an idle instance sleeps on.
            self._cv.notify_all()
            now = time.monotonic()
            start, end = self._plan(now, until=req)[0].get(req, (None, None))
            return ahead, (None if start is None else start - now, None if end is None else end - now)

    def remove(self, req: EngineRequest) -> bool:
        """Take a still-queued request out (cancelled or timed out); False if an instance has it. A
        cancelled row of a batch an instance is gathering is dropped by that instance, woken here: the
        batch need not wait out max_queue_delay for a caller that is gone (nor start empty)."""
        with self._cv:
            try:
                self._levels[req.priority - 1].remove(req)
            except ValueError:
                if any(r is req for g in self._gathering for r in g.rows):
                    self._cv.notify_all()
                return False
            self._report_depth()
            return True

    def close(self) -> list[EngineRequest]:
        """Stop handing out work; wakes every waiting instance. Returns what was still queued, the rows of
        batches instances were gathering included (none of them started)."""
        with self._cv:
            self._closed = True
            left = [r for q in self._levels for r in q]
            for q in self._levels:
                q.clear()
            for gathering in self._gathering:
                left += gathering.rows
                gathering.rows.clear()
            self.on_depth(0)
            self._cv.notify_all()
            return left

    def finish_by(self, deadline: float, why: str, now: Optional[float] = None) -> int:
        """A drain's or an unload's end: from now on no instance starts a request it would not finish by
        `deadline` (time.monotonic()), and the queued requests that would not are handed back at once,
        marked not started (the SDK sends them to another server while there is time, where they would
        have waited out the deadline and then been handed back, or started and been stopped, their work
        lost). Which ones: `_plan`'s, on the estimates of `run_times` (a request of a shape not measured
        is never handed back early). The earliest deadline set holds (a drain during an unload). `why`:
        what ends then, for the callers' message ("the server's drain"). Returns how many."""
        with self._cv:
            now = time.monotonic() if now is None else now
            if self._finish_by is None or deadline < self._finish_by:
                self._finish_by, self._finish_why = deadline, why
            late = self._plan(now, self._finish_by)[1]
            for req in late:
                self._levels[req.priority - 1].remove(req)
                self._hand_back(req)
            if late:
                self._report_depth()
            return len(late)

    def _plan(self, now: float, deadline: Optional[float] = None,
              until: Optional[EngineRequest] = None) -> tuple[dict[EngineRequest, Eta], list[EngineRequest]]:
        """The queue as the instances would take it from `now`, as `next_batch` does: the first request
        in priority order with the queued ones of its shape up to max_batch_size, on the instance free
        first (the running and gathering batches' ends estimated), for its estimated time; a request the
        instance reaching it would not start (`_refusal`) takes none. Returns when each queued request
        would start and end (time.monotonic(); None where not known: from the point an instance whose
        batch is of a shape not measured could take it), and, with `deadline`, the requests that would
        not end by then: a batch is cut to the rows that would (the rest stay queued for the next
        instance), and a request that would not even alone is late, its instance left free. Unknown
        times count as none (every time is a lower bound), so nothing is late on a guess. Without a
        deadline (an estimate to tell a caller), a batch is taken to be as large as its shape's usually
        are, a size not measured takes the nearest measured size's time, and a request that a batch an
        instance is gathering would take (`_joins`) starts with that batch. With `until`, stops once
        that request is placed. Call with the lock held."""
        nearest = deadline is None
        pending = [r for q in self._levels for r in q if not r.is_cancelled()]
        plan: dict[EngineRequest, Eta] = {}
        # told to a caller: a request that a gathering batch takes when its instance wakes (as one just
        # submitted is) starts with that batch; a decision counts it as queued (a drain's end is checked
        # again when the batch starts)
        joins = self._joins(now, pending) if nearest else {}
        free = self._instances_free(now, nearest=nearest, joins=joins, plan=plan)
        heapq.heapify(free)
        joined = {r for rows in joins.values() for r in rows}
        pending = [r for r in pending if r not in joined]
        same: dict[tuple, collections.deque[EngineRequest]] = collections.defaultdict(collections.deque)
        for r in pending:  # each shape's requests in the order instances take them
            same[r.params.batch_key].append(r)
        gone: set[EngineRequest] = set(joined)  # placed, late, or not started by the instance reaching it
        late: list[EngineRequest] = []
        uncertain = False  # an instance free at a time not known came up: which request goes where is not
        for head in pending:
            if not free or (until is not None and until in gone):
                break
            if head in gone:
                continue
            start, unknown = heapq.heappop(free)
            uncertain = uncertain or unknown
            rows = same[head.params.batch_key]
            if self._refusal(head, start) is not None:
                rows.remove(head)
                gone.add(head)
                heapq.heappush(free, (start, unknown))
                continue
            batch: list[EngineRequest] = []
            while rows and len(batch) < self._max_batch:  # the head first: its shape's earliest left
                r = rows.popleft()
                if r is head or self._refusal(r, start) is None:
                    batch.append(r)
                else:  # not started by whichever instance reaches it, from here on
                    gone.add(r)
            # told to a caller: as large a batch as this shape's usually are (later arrivals join it before
            # it starts); a decision: only what is queued now
            size = min(self._max_batch, max(len(batch), self.run_times.usual_size(head.params.batch_key))) \
                if nearest else len(batch)
            if nearest and self._max_batch > 1 and size < self._room():
                # a batch short of its room waits for more rows up to max_queue_delay from its head's
                # arrival (sooner where a row's queue timeout or deadline nears), as `_gather` does; one that
                # batches of its shape usually fill is taken to start when its instance is free
                gathering = self._new_gathering(head, batch)
                gathering.end_before_queue_timeouts()
                start = max(start, gathering.until)
            est = self.run_times.batch(head.params.batch_key, size, nearest=nearest)
            while deadline is not None and est is not None and start + est.end_s > deadline and batch:
                rows.appendleft(batch.pop())  # stays queued for the next instance
                est = self.run_times.batch(head.params.batch_key, len(batch)) if batch else None
            if not batch:
                rows.popleft()
                gone.add(head)
                late.append(head)
                heapq.heappush(free, (start, unknown))
                continue
            gone.update(batch)
            end = start + est.end_s if est is not None and not uncertain else None
            plan.update((r, (None if uncertain else start, end)) for r in batch)
            heapq.heappush(free, (start + est.busy_s, unknown) if est is not None else (start, True))
        return plan, late

    def _joins(self, now: float, pending: list[EngineRequest]) -> dict[int, list[EngineRequest]]:
        """The queued requests that the batches instances are gathering would take when their instances
        wake (`_take_compatible`: each batch's shape, up to max_batch_size, in queue order; a batch that
        has reached its room takes none: it starts, and `_pop_head` leaves its shape to the others), by
        id() of the gathering. Call with the lock held."""
        joins: dict[int, list[EngineRequest]] = {}
        taken: set[EngineRequest] = set()
        for g in self._gathering:
            rows = joins[id(g)] = []
            if len(g.rows) >= g.room:
                continue
            for r in pending:
                if len(g.rows) + len(rows) >= self._max_batch:
                    break
                if r.params.batch_key == g.key and r not in taken and self._refusal(r, now) is None:
                    rows.append(r)
                    taken.add(r)
        return joins

    def _instances_free(self, now: float, *, nearest: bool, joins: Optional[dict[int, list[EngineRequest]]] = None,
                        plan: Optional[dict[EngineRequest, Eta]] = None) -> list[tuple[float, bool]]:
        """When each live instance is free to take queued work, from the running and gathering batches'
        estimated ends: (time.monotonic(), whether that time is not known: a batch of a shape not measured,
        the time then being a lower bound). Of two free at once, the known sorts first. With `joins`
        (`_joins`), a gathering batch holds its queued joiners too (its start moved before their queue
        timeouts, as `_Gathering.end_before_queue_timeouts` will), and their start and end go in `plan`.
        Call with the lock held."""
        free: list[tuple[float, bool]] = []
        for run in self._running.values():
            est = self.run_times.batch(run.key, len(run.rows), nearest=nearest)
            free.append((max(now, run.started + est.busy_s), False) if est else (max(now, run.started), True))
        for g in self._gathering:
            joiners = (joins or {}).get(id(g), [])
            rows = g.rows + joiners
            start = g.start(now, joiners)
            # told to a caller: as large as its shape's batches usually are (see _plan)
            size = min(self._max_batch, max(len(rows), self.run_times.usual_size(g.key))) if nearest else len(rows)
            est = self.run_times.batch(g.key, size, nearest=nearest)
            free.append((start + est.busy_s, False) if est else (start, True))
            if plan is not None:
                plan.update((r, (start, start + est.end_s if est else None)) for r in joiners)
        free += [(now, False)] * max(0, self._live_instances() - len(free))
        return free

    def _busy(self, now: float) -> list[tuple[tuple, list[EngineRequest], float]]:
        """The instances' batches, running or gathering: (shape, rows, when it started or will at the
        latest). Call with the lock held."""
        busy = [(run.key, run.rows, run.started) for run in self._running.values()]
        busy += [(g.key, g.rows, g.start(now)) for g in self._gathering]
        return busy

    def retry_after(self) -> Optional[float]:
        """Seconds from now until an instance is estimated to take work from the queue again (a full
        queue has room then): a lower bound, as a caller refused on it may give up (see
        `transport.status.retry_pushback`). None when not known: some instance runs a batch whose shape
        is not measured, or has run past its estimate (either could be free any moment; telling callers
        "now" would have every refused one retry at once, again and again), or none is live."""
        with self._cv:
            return self._retry_after()

    def _retry_after(self) -> Optional[float]:
        now = time.monotonic()
        busy = self._busy(now)
        if len(busy) < self._live_instances():
            return 0.0  # an idle instance takes queued work at once
        ends = []
        for key, rows, started in busy:
            est = self.run_times.batch(key, len(rows))  # a lower bound (no nearest size's guess)
            if est is None or started + est.busy_s <= now:
                return None
            ends.append(started + est.busy_s)
        return min(ends) - now if ends else None

    def _refusal(self, req: EngineRequest, at: float) -> Optional[VideoGenError]:
        """Why an instance reaching `req` at `at` would not start it, or None: its queue timeout has passed,
        or its deadline would before even the fastest of its shape's latest runs alone could be done on
        the instance (which is no bound: a run slowed by another instance on the same device counts too)."""
        if req.queue_deadline is not None and at >= req.queue_deadline:
            return req.queue_expired()
        fastest = self.run_times.fastest(req.params.batch_key) if req.deadline is not None else None
        if fastest is not None and at + fastest > req.deadline:
            return DeadlineUnreachable(f"the request's deadline is {max(0.0, req.deadline - at):.1f}s away and the "
                                       f"fastest of its shape's latest runs took {fastest:.1f}s on an instance; "
                                       f"not started")
        return None

    def _would_end_late(self, rows: list[EngineRequest], now: float) -> bool:
        """Whether these rows, started now as one batch, would end after the drain's or unload's end."""
        if self._finish_by is None:
            return False
        est = self.run_times.batch(rows[0].params.batch_key, len(rows))
        return est is not None and now + est.end_s > self._finish_by

    def _hand_back(self, req: EngineRequest) -> None:
        # not logged here, under the lock (a blocked log stream would stop every instance): the request's
        # end is logged by the engine with this message, and finish_by's count by ModelRuntime.finish_by
        req.error(NotStarted(f"{self._finish_why} ends before this request would, by the run times of the "
                             f"latest requests of its shape; nothing was done for it: send it again"))
        req.close()

    # -- worker side ------------------------------------------------------------------------------

    def _pop_head(self, now: float) -> Optional[EngineRequest]:
        """The first request in priority order that no instance is gathering a batch for; drops the
        cancelled, and ends the refused (`_refusal`) and those the drain's or unload's end would cut, on
        the way."""
        for q in self._levels:
            for req in list(q):
                if req.is_cancelled():
                    q.remove(req)
                    continue
                refusal = self._refusal(req, now)
                if refusal is not None:
                    q.remove(req)
                    req.error(refusal)
                    req.close()
                    continue
                if self._would_end_late([req], now):
                    q.remove(req)
                    self._hand_back(req)
                    continue
                if any(g.key == req.params.batch_key and len(g.rows) < g.room for g in self._gathering):
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
                if req.params.batch_key == key and not req.is_cancelled() and self._refusal(
                        req, now) is None and not self._would_end_late(batch + [req], now):
                    q.remove(req)
                    batch.append(req)

    def _next_wakeup(self) -> Optional[float]:
        deadlines = [r.queue_deadline for q in self._levels for r in q if r.queue_deadline is not None]
        # a caller's queue timeout may be centuries (timeout_microseconds is a uint64): Condition.wait
        # raises OverflowError past threading.TIMEOUT_MAX, which would end the instance's thread
        return min(max(0.0, min(deadlines) - time.monotonic()), threading.TIMEOUT_MAX) if deadlines else None

    def next_batch(self) -> Optional[list[EngineRequest]]:
        """Block until there is work; None once closed. Batches requests of equal shape."""
        with self._cv:
            while True:
                batch = self._gather()
                if batch is None:
                    return None
                started = time.monotonic()
                # rows checked when they joined, the batch starting later: a row's deadline may now be out
                # of reach (its queue timeout was not: the gathering ended before it)
                for req in list(batch):
                    if req.is_cancelled():  # its caller went away while the batch gathered (ended by its
                        batch.remove(req)   # engine side, as a queued one is): not a row of the batch
                        continue
                    refusal = self._refusal(req, started)
                    if refusal is not None:
                        batch.remove(req)
                        req.error(refusal)
                        req.close()
                # a drain or unload may have begun while the batch gathered: rows that would carry it past
                # its end go back to the queue, from the last taken, for another instance (handed back below
                # if none would finish them in time)
                requeued = False
                while batch and self._would_end_late(batch, started):
                    req = batch.pop()
                    self._levels[req.priority - 1].appendleft(req)
                    requeued = True
                if requeued:
                    self._cv.notify_all()
                if batch:
                    break
            run = self._running[id(batch)] = BatchRun(started, batch)
            if requeued:  # with this batch running: the requeued rows no instance would finish go back now
                for req in self._plan(started, self._finish_by)[1]:
                    self._levels[req.priority - 1].remove(req)
                    self._hand_back(req)
            for req in batch:
                req.phase = RequestPhase.RUNNING
                req.started_at = started
                req.batch_size = len(batch)
                if req.is_cancelled():  # its caller went away since (just now): ended already, or ends
                    run.open_rows -= 1  # finding no run (its engine side cancels before it ends it)
                    run.whole = False
                else:
                    req.run = run
            self._report_depth()
            return batch

    def _gather(self) -> Optional[list[EngineRequest]]:
        """The next batch: wait for a request, then for more of its shape (call with the lock held)."""
        while True:
            if self._closed:
                return None
            now = time.monotonic()
            head = self._pop_head(now)
            if head is not None:
                break
            self._report_depth()  # 0, or requests left to gathering instances
            self._cv.wait(timeout=self._next_wakeup())
        batch = [head]
        if self._max_batch > 1:
            self._take_compatible(batch, now)
            gathering = self._new_gathering(head, batch)
            room = gathering.room
            self._gathering.append(gathering)
            self._report_depth()
            try:
                while len(batch) < room and not self._closed:
                    live = [r for r in batch if not r.is_cancelled()]  # callers gone (remove() woke us)
                    if len(live) < len(batch):
                        batch[:] = live
                        self._report_depth()
                    if not batch:  # nothing left to gather for: next_batch looks for work again
                        break
                    gathering.end_before_queue_timeouts()
                    left = gathering.until - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(timeout=min(left, threading.TIMEOUT_MAX))
                    if self._closed:  # close() took the rows (none started): they end with the queue's
                        break
                    self._take_compatible(batch, time.monotonic())
                    self._report_depth()
            finally:
                self._gathering.remove(gathering)
                self._cv.notify_all()  # requests left for this batch (it filled up) are anyone's again
        return batch

    def _room(self) -> int:
        """How many rows a gathering batch waits for (up to max_queue_delay): the largest preferred size."""
        return min(max(self._batching.preferred_batch_sizes or (self._max_batch,)), self._max_batch)

    def _new_gathering(self, head: EngineRequest, batch: list[EngineRequest]) -> _Gathering:
        """The batch an instance gathers from `head` (`_gather`), and as the plan expects it to (`_plan`):
        up to its room, until max_queue_delay from the head's arrival at the latest."""
        return _Gathering(head.params.batch_key, batch, self._room(),
                          until=head.enqueued_at + self._batching.max_queue_delay_s,
                          fastest=self.run_times.fastest(head.params.batch_key))

    def batch_done(self, batch: list[EngineRequest]) -> None:
        """The instance is done with `batch` (from `next_batch`): it is free from now."""
        with self._cv:
            run = self._running.pop(id(batch), None)
            if run is not None:
                run.busy_s = time.monotonic() - run.started
                self._settle(run)

    def abandon(self, batch: list[EngineRequest]) -> None:
        """`batch` (from `next_batch`) no longer runs for the estimates, nor counts as a measured run: its
        instance was retired while running it (a stall), and calls no `batch_done` for it if the call
        ever returns."""
        with self._cv:
            self._running.pop(id(batch), None)

    def request_ended(self, req: EngineRequest, *, whole: bool) -> None:
        """A request has ended for its caller; `whole`: it succeeded, run in the batch it was handed out
        in. (One no instance took has no run: nothing to do.)"""
        with self._cv:
            run, req.run = req.run, None
            if run is not None:
                run.open_rows -= 1
                run.whole = run.whole and whole
                run.ended = time.monotonic()
                self._settle(run)

    def _settle(self, run: BatchRun) -> None:
        if run.open_rows == 0 and run.busy_s is not None:  # the instance done, every request ended
            self.run_times.add(run)
