"""A model instance: one backend object on one device, driven by its own worker thread.

Everything a backend does (initialize, warm-up, execute, finalize) happens on that one thread:
compiled graphs and CUDA graphs must stay on the thread that made them.
"""
from __future__ import annotations

import concurrent.futures
import copy
import logging
import threading
import time
from typing import Callable, Optional

from ..backends.base import Backend, BackendRequest, InstanceContext, is_out_of_memory
from ..errors import InstanceDead, OutOfMemory, VideoGenError
from .request import EngineRequest
from .scheduler import Scheduler

#: Every instance thread's name starts so (the CLI looks for loads still running at exit).
INSTANCE_THREAD_PREFIX = "instance-"

log = logging.getLogger(__name__)


def _batch_error(exc: Exception, fatal: bool) -> Exception:
    """What each request of a failed batch hears: its instance gone, out of device memory (a backend
    that does not handle it itself, as SVD's does: RESOURCE_EXHAUSTED, what the out-of-memory alert
    counts, not INTERNAL), or the batch's error."""
    if fatal:
        return InstanceDead("the model instance failed")
    if is_out_of_memory(exc) and not isinstance(exc, VideoGenError):  # (a backend's own error says what it means)
        return OutOfMemory("out of device memory for this request; try fewer frames or a smaller size")
    return _own_copy(exc)


def _own_copy(exc: Exception) -> Exception:
    """A batch's error for one of its requests: the same type, arguments and attributes in an object of its
    own, without the traceback (logged above, on the instance thread). Each request raises its error in
    its own coroutine; raising one shared object there chains every raise site's frames onto it, so each
    request would keep the others' frames alive, and clearing it when one call ends (status.abort_call)
    would clear it for the others. Made without calling the type's __init__ (whose parameters need not be
    its args: InvalidRequest(field, reason)); an error that cannot be made so is handed on as it is."""
    try:
        own = type(exc).__new__(type(exc), *exc.args)
        own.args = exc.args
        own.__dict__.update({k: copy.copy(v) for k, v in vars(exc).items()})  # e.g. __notes__, a list
    except Exception:
        return exc
    return own


def _set_done(future: concurrent.futures.Future) -> None:
    try:
        future.set_result(None)
    except concurrent.futures.InvalidStateError:  # done before
        pass


class WarmupSender:
    """Collects a warm-up request's events; raises its error on the worker thread."""

    def __init__(self) -> None:
        self.failure: Optional[BaseException] = None

    def send(self, event: object) -> None:
        pass  # warm-up output is thrown away (frames of a full-size video are tens of MB)

    def error(self, exc: BaseException) -> None:
        self.failure = exc

    def is_cancelled(self) -> bool:
        return False

    def progressed(self) -> None:
        pass


class Instance:
    def __init__(self, *, backend_cls: type[Backend], context: InstanceContext, scheduler: Scheduler,
                 warmup: list[list[BackendRequest]], on_busy: Callable[[int], None],
                 on_batch: Callable[[list[EngineRequest]], None], on_dead: Callable[["Instance"], None],
                 on_busy_seconds: Callable[[float], None] = lambda seconds: None) -> None:
        self.context = context
        self.name = str(context.instance_index)
        self.device = context.device
        self.backend: Backend = backend_cls()
        self.state = "loading"
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        #: (phase, start, end, attributes) of the load, time.monotonic(): the load's trace is built from them
        self.load_phases: list[tuple[str, float, float, dict[str, object]]] = []
        self._scheduler = scheduler
        self._warmup = warmup
        self._on_busy = on_busy
        self._on_busy_seconds = on_busy_seconds
        self._on_batch = on_batch
        self._on_dead = on_dead
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        #: done when the thread's work has ended (awaited with a bound, without holding a thread on a join)
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        #: time.time() at the start of the batch running now, None when idle (a metric: a batch that
        #: never ends shows as one started long ago)
        self.batch_started: Optional[float] = None
        # the batch running now and its time.monotonic() start (the stall watchdog reads them from the
        # loop; the lock orders a retirement against the batch's end)
        self._batch: list[EngineRequest] = []
        self._batch_since = 0.0
        self._batch_lock = threading.Lock()
        self.retired = False  # by the stall watchdog (`retire_if_stalled`): its thread waits where it hangs
        #: done once the thread's work has ended or the instance was retired: what a stop waits for (a
        #: retired instance's thread may never end)
        self.released: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{INSTANCE_THREAD_PREFIX}{context.model_name}-{context.model_version}-{self.name}")

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return self.ready

    def _run(self) -> None:
        try:
            self._work()
        finally:
            _set_done(self.finished)
            _set_done(self.released)

    def _work(self) -> None:
        if not self.ready.set_running_or_notify_cancel():  # nobody waits any more: load nothing
            self.state = "stopped"
            return
        # running: `ready` can no longer be cancelled, so its result is always delivered
        try:
            self.load_seconds = self._timed("initialize", {}, lambda: self.backend.initialize(self.context))
            self.state = "warming"
            t0 = time.perf_counter()
            for batch in self._warmup:
                self._timed("warmup_batch", {"request_id": batch[0].request_id, "batch_size": len(batch)},
                            lambda: self.backend.execute(batch))
                failed = [r.sender.failure for r in batch if r.sender.failure is not None]  # type: ignore[attr-defined]
                if failed:
                    raise RuntimeError(f"warm-up request failed: {failed[0]}")
            self.warmup_seconds = time.perf_counter() - t0
            self._warmup = []
            self.backend.warmed_up()
        except BaseException as exc:  # reported to the loader, which marks the version FAILED
            self.state = "failed"
            self.ready.set_exception(exc)
            self._finalize()
            return
        self.state = "ready"
        self.ready.set_result(None)
        self._serve()
        self._finalize()

    def _timed(self, phase: str, attributes: dict[str, object], work: Callable[[], object]) -> float:
        """Runs one phase of the load and returns its seconds; noted in `load_phases` whether it ends or
        raises (a phase that failed is the one to see in the load's trace)."""
        start = time.monotonic()
        try:
            work()
        finally:
            end = time.monotonic()
            self.load_phases.append((phase, start, end, attributes))
        return end - start

    def _serve(self) -> None:
        try:
            while self._serve_batch():
                pass
        except BaseException:  # noqa: BLE001 - a bug outside a batch's work, or the backend raising SystemExit:
            # the thread ends, so the instance must count as gone, not ready with no thread taking its queue
            log.critical("instance %s of %s/%s stopped on an unexpected error", self.name, self.context.model_name,
                         self.context.model_version, exc_info=True)
            if self.state != "dead":
                self.state = "dead"
                self._on_dead(self)

    def _serve_batch(self) -> bool:
        """Runs the next batch; False once there is none (closed) or the instance is dead."""
        batch = self._scheduler.next_batch()
        if batch is None:
            return False
        fatal = False
        busy = False
        try:
            for req in batch:
                req.instance = self.name
            self._on_busy(+1)
            busy = True
            busy_since = time.monotonic()
            self.batch_started = time.time()
            with self._batch_lock:
                self._batch, self._batch_since = batch, busy_since
            self._on_batch(batch)
            self.backend.execute([BackendRequest(r.request_id, r.params, r.image, r, r.prepared) for r in batch])
        except Exception as exc:
            try:
                fatal = self.backend.device_lost(exc)
            except Exception:  # asking the device failed: as good as an answer
                log.warning("instance %s: device_lost failed", self.name, exc_info=True)
                fatal = True
            log.error("instance %s of %s/%s failed a batch of %d%s", self.name, self.context.model_name,
                      self.context.model_version, len(batch), " (device lost)" if fatal else "", exc_info=True)
            if fatal:  # before anyone hears of it: a caller retrying at once must find the version down
                with self._batch_lock:  # (not if the stall watchdog retired it meanwhile: it told the engine)
                    first, self.state = self.state != "dead", "dead"
                if first:
                    self._on_dead(self)
            for req in batch:
                req.error(_batch_error(exc, fatal))
        except BaseException:
            for req in batch:  # its callers hear of it before the instance goes (see _serve)
                req.error(InstanceDead("the model instance stopped"))
            raise
        finally:
            with self._batch_lock:
                self._batch = []
                # retired while running this batch: `retire_if_stalled` counted its time, and the watchdog
                # takes it out of the scheduler's runs (not a measured run, however it ended)
                retired = self.retired
            if not retired:
                self._scheduler.batch_done(batch)
            for req in batch:
                req.close()
            if busy and not retired:  # the time first: a scrape that reads the instance idle reads its batch's time too
                self._end_busy(busy_since)
        return not fatal and self.state != "dead"  # (retired meanwhile: a stall)

    def _end_busy(self, since: float) -> None:
        self._on_busy_seconds(time.monotonic() - since)
        self.batch_started = None
        self._on_busy(-1)

    def retire_if_stalled(self, limit: float, now: float) -> Optional[tuple[list[EngineRequest], float]]:
        """If the batch running now has shown no progress for `limit` seconds at `now` (none since its
        start or the last event its backend sent for any of its requests: a step, a decoded chunk, a
        `progressed()`), marks the instance dead from outside its thread: it takes no more work, even if
        that call returns one day, and no longer counts as busy (its busy time so far is counted now).
        Returns that batch and how long it was silent; None if the instance is idle, not ready, or not
        stalled. Read and decided under the lock the batch's start and end take."""
        with self._batch_lock:
            batch = self._batch
            if self.state != "ready" or not batch:
                return None
            stalled = now - max(self._batch_since, max(r.last_sent for r in batch))
            if stalled < limit:
                return None
            self.state = "dead"
            self.retired = True
            self._end_busy(self._batch_since)
        _set_done(self.released)
        return batch, stalled

    def _finalize(self) -> None:
        try:
            self.backend.finalize()
        except Exception:
            log.warning("finalize of instance %s failed", self.name, exc_info=True)
        if self.state != "dead":
            self.state = "stopped"
