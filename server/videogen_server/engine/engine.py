"""The engine: loaded models, admission, one async generator per request, lifecycle.

    engine = Engine(settings, metrics)
    await engine.start()                 # load (and warm up) the models the control mode asks for
    async for event in engine.generate(call):
        ...                              # AcceptedEvent, ProgressEvent, FrameEvent, VideoEvent, SummaryEvent
    await engine.shutdown()

Cancellation lives here: when the consumer of `generate` goes away (client cancel, deadline,
disconnect), the generator's cleanup takes the request out of the queue or tells its instance to
stop at the next denoising step or decode chunk, once, whatever the transport.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional

from PIL import Image

from ..backends.base import (COMPILE_ARTIFACTS_FOLDER, BackendRequest, Finished, FramesDecoded, InstanceContext,
                             ModelSettingError, PhaseTiming, StepDone, load_backend_class)
from ..config import ServerConfig
from ..errors import (MAX_MESSAGE_BYTES, BackendError, ConfigError, Draining, InstanceDead, InvalidRequest,
                      LoadFailed, ModelNotFound, NotLoaded, NotReady, NotStarted, QueueFull, ReaderStalled,
                      RequestCancelled, VideoGenError, clip, status_name)
from ..media.frames import encode_frame
from ..media.mp4 import FragmentedMP4Encoder
from ..metrics import InstanceCollector, Metrics, NvmlReader
from ..tracing import RequestTrace, Tracing, logged_trace_id
from ..domain import (AcceptedEvent, EngineEvent, FrameEncoding, FrameEvent, GenerateCall,
                     ProgressEvent, ResolvedParams, SummaryEvent, VideoEvent)
from . import repository
from .repository import check_model_name, is_model_name
from .admission import decode_image, fit_image, quiet_decompression_bomb_warnings, resolve_params
from .devices import cuda_uuids
from .instance import Instance, WarmupSender
from .model_config import InstanceGroup, ModelSettings, resolve_instance_groups
from .request import CLOSED, EngineRequest, RequestPhase, _Failed
from .scheduler import Scheduler
from .stats import ModelStats, StatsSnapshot

log = logging.getLogger(__name__)

#: At the server's stop, how long each instance's thread may take to end once its requests have (its
#: current torch call returning: on a GPU a fraction of a second) before the process leaves without it.
#: Within the manifests' margin: a 90 s drain, this, and the rest of the stop under their 120 s grace.
STOP_JOIN_SECONDS = 10.0
request_log = logging.getLogger("videogen.requests")
#: Refusals (outcome rejected) logged one by one each second; more are summed in one line at its end. A
#: server at its limits refused ~200 calls a second, each its own line, when the log matters most (review).
REFUSALS_LOGGED_PER_SECOND = 10


class _RefusalLog:
    """At most REFUSALS_LOGGED_PER_SECOND refusal lines a second; the rest counted by status code and
    summed in one line a second after the first of them. Every refusal is in videogen_requests_total."""

    def __init__(self) -> None:
        self._window = -1.0
        self._logged = 0
        self._skipped: collections.Counter = collections.Counter()
        self._flush: Optional[asyncio.TimerHandle] = None

    def take(self, code: str) -> bool:
        """Whether to log this refusal one by one (on the event loop)."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._logged = now, 0
        if self._logged < REFUSALS_LOGGED_PER_SECOND:
            self._logged += 1
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (off the loop: logged as it comes)
            return True
        self._skipped[code] += 1
        if self._flush is None:
            self._flush = loop.call_later(1.0, self.flush)
        return False

    def flush(self) -> None:
        """Logs the summed refusals now (at their second's end; at shutdown, whatever is pending)."""
        if self._flush is not None:
            self._flush.cancel()
        self._flush = None
        if self._skipped:
            request_log.info("%d more requests refused in the last second, not logged one by one (counted in "
                             "videogen_requests_total): %s", sum(self._skipped.values()),
                             ", ".join(f"{code}={n}" for code, n in sorted(self._skipped.items())))
            self._skipped.clear()


def sample_image() -> Image.Image:
    """The image that ships with the server (demo and warm-up)."""
    with resources.files("videogen_server.assets").joinpath("sample.png").open("rb") as f:
        return Image.open(f).convert("RGB")


@dataclasses.dataclass
class VersionStatus:
    version: int
    state: str
    reason: str = ""


@dataclasses.dataclass
class ModelStatus:
    """What ListModels/GetModel report (the transport converts it)."""

    name: str
    backend: str
    state: str
    versions: list[VersionStatus]
    settings: Optional[ModelSettings]
    instances: int
    reason: str = ""  # why it does not serve (a config error, failed loads), for operators
    # the newest ready version's instance groups as loaded here (KIND_AUTO resolved, GPUs filled in)
    instance_groups: tuple[InstanceGroup, ...] = ()


def _end(req: EngineRequest, exc: Exception) -> None:
    """Ends `req` from the server's side with `exc` (kept as the reason, unless it had one); a running
    one stops at its next step or chunk."""
    if req.ended_by_server is None:
        req.ended_by_server = exc
    req.error(exc)
    req.cancel()


class ModelRuntime:
    """One loaded version of a model: its queue and its instances."""

    def __init__(self, settings: ModelSettings, version: int, engine: "Engine") -> None:
        self.settings = settings
        self.name = settings.name
        self.version = version
        self.state = "LOADING"
        self.reason = ""
        #: the version folder's fingerprint taken before this runtime loaded: what it serves (poll mode
        #: reloads it when the folder's fingerprint is another)
        self.files: Optional[str] = None
        self.active: set[EngineRequest] = set()  # admitted and not finished
        self.preparing = 0  # requests whose image is being decoded and preprocessed for this version
        self.idle = asyncio.Event()  # set while nothing is active or preparing (an unload waits for it)
        self.idle.set()
        # instances that die together (one lost device under several) report on their own threads: one at
        # a time, so the gauge and the reason end on the final count
        self._dead_lock = threading.Lock()
        labels = (self.name, str(version))
        m = engine.metrics
        self.labels = labels
        self.scheduler = Scheduler(batching=settings.batching, max_batch_size=settings.max_batch_size,
                                   on_depth=lambda depth: engine._queue_depth(self, depth),
                                   live_instances=lambda: sum(i.state == "ready" for i in self.instances))
        # bound now: a request of this runtime ending after its series were removed (see Engine._publish)
        # updates a detached child instead of bringing the series back
        self.inflight_gauge = m.inflight.labels(*labels)
        self.instances: list[Instance] = []
        self.instance_groups: tuple[InstanceGroup, ...] = ()  # as loaded on this host (KIND_AUTO resolved)
        self.stats = ModelStats()  # cumulative, for the Open Inference Protocol's ModelStatistics
        self._engine = engine
        engine._runtimes.add(self)  # until stopped: the drain and shutdown reach it wherever it is

    def _contexts(self) -> list[InstanceContext]:
        from .devices import gpu_count  # torch is imported only when a model is loaded

        contexts: list[InstanceContext] = []
        path = self.settings.path / str(self.version)
        self.instance_groups = resolve_instance_groups(self.settings.instance_groups, gpu_count(),
                                                       str(self.settings.config_path))
        for group in self.instance_groups:
            if group.kind == "gpu":
                devices = [f"cuda:{g}" for g in group.gpus for _ in range(group.count)]
            else:
                devices = ["cpu"] * group.count
            for device in devices:
                contexts.append(InstanceContext(
                    model_name=self.name, model_version=self.version, version_path=path,
                    parameters=self.settings.parameters, device=device, instance_index=len(contexts),
                    max_batch_size=self.settings.max_batch_size, cpu_threads=self._engine.config.cpu_threads,
                    max_decode_chunk_size=self.settings.limits.decode_chunk_limit,
                    compile_artifacts_out=self._engine.compile_artifacts_out(self.name, self.version)))
        return contexts

    def _warmup_inputs(self) -> list[tuple[str, ResolvedParams, int]]:
        """(name, parameters, batch size) of every warm-up batch, in order."""
        out = []
        for w in self.settings.warmup:
            params = w.params(self.settings.defaults, self.settings.limits)
            # each batch_size needs its own compiled graph: warm it too. A fixed seed (0 unless given), so
            # warm-ups repeat from one start to the next
            seed = params.seed if "seed" in w.inputs else 0
            out += [(f"warmup-{w.name}-{n}", dataclasses.replace(params, seed=seed), w.batch_size)
                    for n in range(w.count)]
        return out

    async def load(self) -> None:
        started, error = time.monotonic(), None
        try:
            await self._load()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._engine.tracing.record_load(self.name, self.version, self.settings.backend, started,
                                             self.instances, error)

    async def _load(self) -> None:
        m = self._engine.metrics
        backend_cls = load_backend_class(self.settings.backend)
        t0 = time.perf_counter()
        busy = m.instances_busy.labels(*self.labels)
        batch_hist = m.batch_size.labels(*self.labels)

        def on_batch(batch: list[EngineRequest]) -> None:
            batch_hist.observe(len(batch))
            self.stats.executed()

        warmups, image = self._warmup_inputs(), sample_image()
        for ctx in self._contexts():
            batches = [[BackendRequest(f"{name}-{b}", params, image, WarmupSender()) for b in range(size)]
                       for name, params, size in warmups]
            self.instances.append(Instance(
                backend_cls=backend_cls, context=ctx, scheduler=self.scheduler, warmup=batches,
                on_busy=busy.inc, on_batch=on_batch, on_dead=self._instance_dead,
                on_busy_seconds=m.instance_busy_seconds.labels(*self.labels, str(ctx.instance_index)).inc))
        futures = [asyncio.wrap_future(inst.start()) for inst in self.instances]
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:  # cancelled (a shutdown): the instances finish loading, then find no work
            self._close_queue(lambda: NotReady(f"model {self.name!r} was unloaded"))
            raise
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        m.load_duration.labels(*self.labels).set(time.perf_counter() - t0)
        m.queue_capacity.labels(*self.labels).set(self.scheduler.max_queue_size)
        self._engine._stuck_series(self.labels, serving=True)
        m.warmup_duration.labels(*self.labels).set(max(i.warmup_seconds for i in self.instances))
        self.state = "READY"
        m.instances_lost.labels(*self.labels).set(0)
        m.model_ready.labels(*self.labels).set(1)

    def retire_stalled(self, limit: float) -> None:
        """On the loop: retires each instance whose running batch has shown no progress for `limit`
        seconds (--instance-stall-seconds): a backend call that does not return (a hung kernel, a driver
        wait) held its requests and the instance for good, the queue behind it, and kept liveness
        green. Its requests end UNAVAILABLE (their callers decide: they had started), the instance takes
        no more work and counts as lost (the last one takes the version down; the server's last serving
        version, liveness with it). Its thread cannot be stopped: it is left where it hangs, counted
        stuck (only a restart frees what it holds)."""
        now = time.monotonic()
        for inst in self.instances:
            retired = inst.retire_if_stalled(limit, now)
            if retired is None:
                continue
            batch, stalled = retired
            # (one whose result went out already, in a batch re-run request by request, keeps it)
            unfinished = [req for req in batch if not req.finished]
            try:
                log.critical("instance %s of %s/%s: no progress for %.0fs in a batch of %d (%s unfinished; "
                             "--instance-stall-seconds %g): retired, its requests ended; its thread is left where "
                             "it waits (a py-spy dump of the process shows where), holding what it holds: a "
                             "restart frees it (a hung device needs one); a reload starts a new instance",
                             inst.name, self.name, self.version, stalled, len(batch),
                             ", ".join(r.request_id for r in unfinished) or "none", limit)
                self._engine.count_stuck(self, inst)
                self.scheduler.abandon(batch)  # (not a measured run, nor an instance to be free soon)
                self._instance_dead(inst)  # before its callers hear: one retrying at once finds the version down
            finally:  # (whatever failed above: nothing else would end them)
                for req in unfinished:
                    _end(req, InstanceDead(f"the model instance made no progress for {stalled:.0f}s and was "
                                           f"retired"))

    def _instance_dead(self, instance: Instance) -> None:
        """On the dead instance's thread (the loop's, for a stall). The last one takes the version down
        with it; before that, the version serves on fewer instances, which the gauge and GetModel's
        `reason` say until a reload."""
        with self._dead_lock:
            entry = self._engine.models.get(self.name)
            current = entry is None or entry.loaded.get(self.version, self) is self  # not a reload's retiring one
            lost = sum(i.state == "dead" for i in self.instances)
            if current:
                self._engine.metrics.instances_lost.labels(*self.labels).set(lost)
            if lost < len(self.instances):
                self.reason = (f"{lost} of {len(self.instances)} instances stopped for good (a lost device, an "
                               f"unexpected error or a stall: see the server log); a reload of the model starts "
                               f"new ones, a restart frees what they held (a hung device needs one)")
            if all(i.state == "dead" for i in self.instances):
                self.state = "FAILED"
                self.reason = ("every instance stopped for good (a lost device, an unexpected error or a stall: "
                               "see the server log)")
                if current:
                    self._engine.metrics.model_ready.labels(*self.labels).set(0)
                # nothing would ever take them; none was started, so their callers may send them elsewhere
                self._close_queue(lambda: NotStarted(
                    f"model {self.name!r} version {self.version} lost its instances before the request started; "
                    f"nothing was done for it: send it again"))
                self._engine._loop.call_soon_threadsafe(self._engine._notify)

    async def unload(self, timeout: float, join_timeout: Optional[float] = None) -> None:
        """Stop admitting, let in-flight requests finish (up to `timeout`), then free the instances
        (`stop`'s `join_timeout`)."""
        self.state = "UNLOADING"
        entry = self._engine.models.get(self.name)
        if entry is None or entry.loaded.get(self.version, self) is self:
            # else a reload put a new runtime of this version in its place: the gauges are that one's now
            self._engine.metrics.model_ready.labels(*self.labels).set(0)
        self.finish_by(time.monotonic() + timeout, f"the unload of model {self.name!r} version {self.version}")
        try:
            if not self.idle.is_set():  # requests running, queued or still in preprocessing
                await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("unload of %s/%s: %d requests still running (%d in preprocessing) after %.0fs; "
                        "cancelling them", self.name, self.version, len(self.active), self.preparing, timeout)
        await self.stop(join_timeout)
        self.state = "UNAVAILABLE"

    async def stop(self, join_timeout: Optional[float] = None) -> None:
        """Ends every request and waits for the instances' threads: each ends once its current torch call
        (a denoising step, a decode chunk) returns; with `join_timeout`, one still running after it is
        named in the log and left to the process's exit (the server's stop: a call that never returns
        kept the process up until the orchestrator killed it; lifecycle audit)."""
        # UNAVAILABLE (retryable elsewhere, unlike CANCELLED); a request still queued was never started
        self._close_queue(lambda: NotStarted(f"model {self.name!r} was unloaded before the request started; "
                                             f"nothing was done for it: send it again"))
        self.end_active(lambda req: NotReady(f"model {self.name!r} was unloaded"))
        # awaited, not joined on an executor thread: a thread blocked in a join of a call that never
        # returns held the loop's default executor, whose shutdown then held the process's exit (review)
        # (one retired for a stall, before or during this wait, is not waited for: it waits where it hangs,
        # and an unload or a reload waiting on it held the model's control for good)
        waits = [asyncio.wrap_future(inst.released) for inst in self.instances]
        if waits:
            await asyncio.wait(waits, timeout=join_timeout)
        for inst, wait in zip(self.instances, waits):
            if not wait.done():
                log.error("instance %s of %s/%s still busy %.0fs after its requests ended (a backend call that "
                          "does not return): left to the process's exit", inst.name, self.name, self.version,
                          join_timeout)
        self._engine._forget(self)

    def finish_by(self, deadline: float, why: str) -> None:
        """Nothing starts that would not end by `deadline` (`why`: "the server's drain", an unload); the
        queued requests that would not are handed back now (`Scheduler.finish_by`)."""
        back = self.scheduler.finish_by(deadline, why)
        if back:
            log.info("%s/%s: %d queued requests would not finish before %s ends (%.0fs); handed back, not "
                     "started", self.name, self.version, back, why, max(0.0, deadline - time.monotonic()))

    def end_active(self, error: Callable[[EngineRequest], Exception]) -> int:
        """Ends every request admitted and not finished, queued or running, with its own `error(req)`
        (running ones stop at their next step or chunk). Returns how many."""
        requests = list(self.active)
        for req in requests:
            _end(req, error(req))
        return len(requests)

    def _close_queue(self, error: Callable[[], Exception]) -> None:
        """Stops the scheduler handing out work; each request still queued ends with its own `error()`,
        kept as the reason the server ended it (an `end_active` after this, as `stop` does, would
        otherwise tell a request no instance started that it was stopped, and its caller would not
        send it again)."""
        for req in self.scheduler.close():
            exc = error()
            if req.ended_by_server is None:
                req.ended_by_server = exc
            req.error(exc)
            req.close()

    def update_idle(self) -> None:
        if self.active or self.preparing:
            self.idle.clear()
        else:
            self.idle.set()

    def reserve_queue_slot(self) -> None:
        """Admission's first step, before any image work: refuse at once when the queue is full (so
        shedding load stays cheap), or when more requests are in preprocessing than the queue and the
        instances could take (they would be refused after it); else count this one in flight."""
        limit = self.scheduler.max_queue_size
        if self.scheduler.depth() >= limit or self.preparing >= limit + self.capacity:
            raise QueueFull(f"model {self.name!r} queue is full ({limit} waiting); retry later",
                            retry_after=self.scheduler.retry_after())
        # Admitted and not ended: queued, running, and done on the device but with output its caller has
        # not read yet (frames and video held in memory). Callers that never read held any number of them
        # (security audit: 30 beside a queue of 16, ~44 MB each at SVD-XT's size); a batch's worth of
        # outputs still being read is room enough beside a full queue and busy instances.
        held = limit + 2 * self.capacity
        if len(self.active) >= held:
            raise QueueFull(f"model {self.name!r} has {len(self.active)} requests in flight, the output of some not "
                            f"yet read by their callers (at most {held}); retry later",
                            retry_after=self.scheduler.retry_after())
        self.preparing += 1
        self.update_idle()

    @property
    def capacity(self) -> int:
        """Requests the live instances can run at once (batches of max_batch_size with dynamic batching,
        else of one)."""
        return sum(i.state != "dead" for i in self.instances) * max(1, self.scheduler.max_batch)

    def release_queue_slot(self) -> None:
        self.preparing -= 1
        self.update_idle()

    def live_backend(self):
        """A ready instance's backend, for CPU preprocessing (`prepare`) at admission."""
        for inst in self.instances:
            if inst.state == "ready":
                return inst.backend
        raise NotReady(f"model {self.name!r} version {self.version} has no live instance")

    def instance_rows(self):
        for inst in self.instances:
            if inst.state in ("ready", "warming"):
                yield self.name, str(self.version), inst.name, inst.device, inst.backend, inst.batch_started


class ModelEntry:
    """A model in the repository and whichever of its versions are loaded."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.settings: Optional[ModelSettings] = None
        self.loaded: dict[int, ModelRuntime] = {}
        self.failed: dict[int, str] = {}
        self.error = ""
        self.fingerprint: Optional[repository.Fingerprint] = None  # of the files its last load read
        self.lock = asyncio.Lock()
        self.loading: Optional[asyncio.Task[None]] = None  # the load in flight, which later loads join
        self.published: set[str] = set()  # version labels whose per-version gauges are exported
        self.peaks: set[tuple[str, str, str]] = set()  # (version, instance, device) of the peak-memory gauge

    def select(self, version: Optional[int]) -> ModelRuntime:
        if version:
            rt = self.loaded.get(version)
            if rt is None:
                raise ModelNotFound(f"model {self.name!r} has no loaded version {version}")
        else:
            ready = [rt for v, rt in sorted(self.loaded.items(), reverse=True) if rt.state == "READY"]
            if not ready:
                # why a load failed (file paths, driver text) is for operators: GetModel and the log
                if self.error:
                    raise LoadFailed(f"model {self.name!r} is not ready (it failed to load)")
                raise NotLoaded(f"model {self.name!r} is not ready")
            rt = ready[0]
        if rt.state != "READY":
            raise NotReady(f"model {self.name!r} version {rt.version} is {rt.state.lower()}")
        return rt


def _check_frame_bytes(params: ResolvedParams, limit: Optional[int]) -> None:
    """InvalidRequest when the request's frames, as raw RGB, are more than its transport can send at once."""
    size = params.num_frames * params.height * params.width * 3
    if limit is not None and size > limit:
        raise InvalidRequest("frames", f"{params.num_frames} frames of {params.width}x{params.height} are "
                                       f"{size / 2**30:.2f} GiB of RGB, more than one response holds "
                                       f"({limit / 2**30:.2f} GiB): ask for fewer or smaller frames, the video "
                                       f"alone, or a streaming call (a frame a message)")


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.tracing = Tracing(config)  # started by the server's start-up (exporter thread), stopped at its end
        self._refusal_log = _RefusalLog()
        self.models: dict[str, ModelEntry] = {}
        self._scanned = False
        self.draining = False
        self._refusing = False  # a drain that refuses new requests (begin_drain's refuse_new)
        quiet_decompression_bomb_warnings()
        self.started = False  # start-up's loads done
        self._listeners: list[Callable[[], None]] = []
        self._media = concurrent.futures.ThreadPoolExecutor(max_workers=config.media_threads,
                                                            thread_name_prefix="media")
        self._decode = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess")
        self._poller: Optional[asyncio.Task[None]] = None
        self._watchdog: Optional[asyncio.Task[None]] = None  # --instance-stall-seconds
        self._unreadable: set[str] = set()  # model folders the last scan could not read
        self._skipped: set[str] = set()  # what the last scan said of folders it did not serve (logged once)
        self._control_tasks: set[asyncio.Task[None]] = set()  # loads and unloads (strong references)
        #: loads of models new to the engine (no entry yet to hold the task): a second load joins
        self._first_loads: dict[str, asyncio.Task[None]] = {}
        # every runtime not yet stopped: serving, loading, or retiring after a reload (then no longer in
        # its entry's `loaded`, while its requests finish)
        self._runtimes: set[ModelRuntime] = set()
        # queue depth per runtime, by version labels: an in-place reload's retiring runtime runs its queue
        # beside the new one, under the same labels, and the gauge is their sum (instance threads write it)
        self._depths: dict[tuple[str, str], dict[ModelRuntime, int]] = {}
        self._depth_lock = threading.Lock()
        # retired instances still in their call, by version labels (`count_stuck`; instance threads end them)
        self._stuck: dict[tuple[str, str], int] = {}
        self._stuck_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop
        metrics.add_collector(InstanceCollector(self._instance_rows, NvmlReader.try_create(cuda_uuids)))

    # -- lifecycle --------------------------------------------------------------------------------

    def scan(self) -> None:
        """Read the repositories' model folders (once). The server does it before its ports answer, so a
        NOT_FOUND is final from the first call on, never "not read yet"."""
        if self._scanned:
            return
        for name, path in self._scan().items():
            self.models[name] = ModelEntry(name, path)
        self._scanned = True

    def _scan(self) -> dict[str, Path]:
        """repository.scan, logging each folder it cannot read or does not serve once (then again if it
        came back and went): a model in two repositories was logged at every poll, ~5 800 errors a day."""
        unreadable: dict[str, str] = {}
        skipped: list[str] = []
        found = repository.scan(self.config.model_repositories, unreadable, skipped)
        for name, why in unreadable.items():
            if name not in self._unreadable:
                log.error("model folder %s cannot be read (%s); not served, and no other model held up", name, why)
        for message in skipped:
            if message not in self._skipped:
                log.error("%s", message)
        self._unreadable, self._skipped = set(unreadable), set(skipped)
        return found

    async def start(self) -> None:
        """Scan the repository (unless done) and load what the model control mode asks for."""
        self._loop = asyncio.get_running_loop()
        self.scan()
        mode = self.config.model_control_mode
        if mode == "explicit":
            unknown = [n for n in self.config.load_models if n not in self.models and n != "*"]
            if unknown:
                # named as the command line named them (compile-artifacts takes them as --model)
                flag = "--model" if self.config.write_compile_artifacts else "--load-model"
                where = ", ".join(str(r) for r in self.config.model_repositories)
                raise ConfigError(where, flag, f"not in the repository: {unknown}")
            names = list(self.models) if "*" in self.config.load_models else list(self.config.load_models)
        else:
            names = list(self.models)
        if self.config.instance_stall_seconds and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_stalls(self.config.instance_stall_seconds))
        await asyncio.gather(*(self.load_model(n, raise_errors=False) for n in names))
        if mode == "poll":
            self._poller = asyncio.create_task(self._poll())
        self.started = True
        self._notify()

    async def _watch_stalls(self, limit: float) -> None:
        """Every runtime's `retire_stalled`, a few times within each `limit`."""
        while True:
            await asyncio.sleep(min(max(limit / 4, 0.05), 5.0))
            for rt in list(self._runtimes):
                try:
                    rt.retire_stalled(limit)
                except Exception:  # (a bug here must not end the watch for the others)
                    log.exception("stall watch of %s/%s failed", rt.name, rt.version)

    def count_stuck(self, rt: "ModelRuntime", inst: Instance) -> None:
        """`inst` was retired with its thread still in a call: `videogen_instances_stuck` counts it until
        that call returns, whatever happens to its version (a reload or an unload forgets the version's
        other gauges): only a restart frees what the thread holds."""
        with self._stuck_lock:
            self._stuck[rt.labels] = self._stuck.get(rt.labels, 0) + 1
            self.metrics.instances_stuck.labels(*rt.labels).set(self._stuck[rt.labels])

        def returned(_finished) -> None:  # (on its thread, if it ever returns)
            with self._stuck_lock:
                self._stuck[rt.labels] -= 1
                self.metrics.instances_stuck.labels(*rt.labels).set(self._stuck[rt.labels])

        inst.finished.add_done_callback(returned)

    def _stuck_series(self, labels: tuple[str, str], serving: bool) -> None:
        """`videogen_instances_stuck` for a version: exported (at 0 unless some are) while it serves, and
        after it goes for as long as a retired thread of it is still in its call."""
        with self._stuck_lock:
            if serving or self._stuck.get(labels):
                self.metrics.instances_stuck.labels(*labels).set(self._stuck.get(labels, 0))
            else:
                _remove_series(self.metrics.instances_stuck, *labels)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (on the event loop) whenever readiness may have changed."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def model_ready(self, name: str) -> bool:
        entry = self.models.get(name) if is_model_name(name) else None
        return bool(entry) and not self.draining and any(rt.state == "READY" for rt in entry.loaded.values())

    @property
    def ready(self) -> bool:
        """Every model the control mode asked for is loaded and warmed up, and we are not draining; with
        `strict_readiness` off, `serving` once start-up's loads are ready (one at least)."""
        if not self.config.strict_readiness and self.started:
            return self.serving and any(self.model_ready(name) for name in self.models)
        wanted = [e for e in self.models.values() if e.loaded or e.error or e.failed]
        return not self.draining and bool(wanted) and all(self.model_ready(e.name) for e in wanted)

    @property
    def serving(self) -> bool:
        """The server takes calls: start-up's loads are done (each model ready or failed), no drain has
        begun, and not every loaded version has lost its instances (device errors: nothing here would
        run a request, and the orchestrator restarts the pod). A model that failed to load, or none
        loaded yet, leaves it serving the others and the model control calls; whether a model takes
        requests is `model_ready`'s to say."""
        loaded = [rt for e in self.models.values() for rt in e.loaded.values()]
        lost = bool(loaded) and all(rt.state == "FAILED" for rt in loaded)
        return self.started and not self.draining and not lost

    def begin_drain(self, finish_by: Optional[float] = None, refuse_new: bool = True) -> None:
        """Not ready from now on (health, KServe's readiness, GetModel: UNLOADING, no load or reload);
        `refuse_new`: refuse new requests too (an engine whose callers could still reach it). The
        server's drain passes False: it closes its port, and what gRPC took before is admitted as any
        (a call whose message was still on its way was refused: review). With `finish_by`
        (time.monotonic(), the grace's end), start nothing that would not end by then and hand back
        at once what is queued and would not."""
        self.draining = True
        self._refusing = self._refusing or refuse_new
        if self._poller:  # no reload starts during a drain
            self._poller.cancel()
        if finish_by is not None:
            for rt in list(self._runtimes):
                rt.finish_by(finish_by, "the server's drain")
        self._notify()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` passes (False)."""
        runtimes = [rt for rt in self._runtimes if not rt.idle.is_set()]
        try:
            await asyncio.wait_for(asyncio.gather(*(rt.idle.wait() for rt in runtimes)), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # the per-version gauges: they describe what serves now, so a version that went away takes them along
    # (its counters and histograms stay: they count what it did, and rate() ends with them)
    _VERSION_GAUGES = ("model_ready", "queue_depth", "queue_capacity", "inflight", "instances_busy", "load_duration",
                       "warmup_duration", "instances_lost")
    # the request outcomes the alerts watch: exported at 0 from the start, since increase() over a series
    # that appears at its first event reads 0 for that event
    _ALERTED_OUTCOMES = (("error", "RESOURCE_EXHAUSTED"), ("rejected", "RESOURCE_EXHAUSTED"), ("error", "INTERNAL"),
                         ("error", "UNAVAILABLE"))

    def _queue_depth(self, rt: ModelRuntime, depth: Optional[int]) -> None:
        """`rt`'s queue now holds `depth` requests (None: `rt` is gone); sets its version's gauge to the
        sum over that version's runtimes. A version whose last runtime went keeps its series as it was,
        for `_publish` to remove."""
        with self._depth_lock:
            depths = self._depths.setdefault(rt.labels, {})
            if depth is None:
                depths.pop(rt, None)
            else:
                depths[rt] = depth
            if not depths:
                del self._depths[rt.labels]
            else:
                self.metrics.queue_depth.labels(*rt.labels).set(sum(depths.values()))

    def _forget(self, rt: ModelRuntime) -> None:
        """`rt` is stopped (or never started an instance): no drain or shutdown needs to reach it."""
        self._runtimes.discard(rt)
        self._queue_depth(rt, None)

    def _publish(self, entry: ModelEntry) -> None:
        """Brings a model's per-version series in line with its state: `videogen_model_ready` for every
        version loaded (1 once READY) or that failed to load (0), and for a model whose files could not be
        read, under version "" (0), so that the not-ready alert sees failures too; the gauges of versions
        no longer there are removed, so that alert does not fire for good after a rollout or an unload."""
        m = self.metrics
        now = {str(v): 1 if rt.state == "READY" else 0 for v, rt in entry.loaded.items()}
        for v in entry.failed:
            now.setdefault(str(v), 0)
        if entry.error and not now:
            now[""] = 0
        for version in entry.published - now.keys():
            for gauge in self._VERSION_GAUGES:
                _remove_series(getattr(m, gauge), entry.name, version)
            self._stuck_series((entry.name, version), serving=False)
        # the peaks of instances gone: with their version, or from a version reloaded in place with fewer
        # instances or on other devices (those stayed for good; metrics audit)
        serving = {(str(v), inst.name, inst.device) for v, rt in entry.loaded.items() for inst in rt.instances}
        for peak in [p for p in entry.peaks if p not in serving]:
            _remove_series(m.last_peak, entry.name, *peak)
            entry.peaks.discard(peak)
        for version, ready in now.items():
            m.model_ready.labels(entry.name, version).set(ready)
            if version and version not in entry.published:
                for outcome, code in self._ALERTED_OUTCOMES:
                    m.requests.labels(entry.name, version, outcome, code)
        entry.published = set(now)

    def end_requests(self, grace: float, cut_short: bool = False) -> int:
        """The drain's end, `grace` seconds in (or before, `cut_short` by a second signal): ends every
        request still in flight. One that is running ends UNAVAILABLE as an error (its caller hears why;
        metrics count an error, not a cancellation); one no instance has taken ends NotStarted (nothing
        was done for it, and its caller, the SDK, sends it again, to another server). Returns how many."""
        when = "when its drain was cut short" if cut_short else f"after the drain grace of {grace:.0f}s"
        ended = 0
        for rt in list(self._runtimes):
            # the whole queue in one step: an instance freed by a stopped request takes nothing more
            queued = set(rt.scheduler.close())

            def error(req: EngineRequest, queued: set = queued) -> Exception:
                if req in queued:
                    return NotStarted(f"the server shut down before the request started ({when}); nothing "
                                      f"was done for it: send it again")
                return Draining(f"the server shut down; the request was stopped {when}")

            ended += rt.end_active(error)
        return ended

    async def shutdown(self, grace: float = 0.0) -> None:
        self.begin_drain()
        if self._watchdog is not None:  # (the drain's end stops what runs; the unloads below, what is left)
            self._watchdog.cancel()
        # loads and unloads still in flight stop here; their runtimes (retiring after a reload, or still
        # loading) are in _runtimes until stopped, and the retiring ones are unloaded below with the rest
        for task in list(self._control_tasks):
            task.cancel()
        await asyncio.gather(*self._control_tasks, return_exceptions=True)
        # A load cut short closed its queue; its instances finish initialising and warming up (a
        # compile: minutes), find no work and exit. Not waited for: the process is going.
        await asyncio.gather(*(rt.unload(grace, STOP_JOIN_SECONDS) for rt in list(self._runtimes)
                               if rt.state != "LOADING"))
        self._media.shutdown(wait=False, cancel_futures=True)
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._refusal_log.flush()  # the last second's refusals, before the loop that would log them stops

    # -- model control ----------------------------------------------------------------------------

    async def load_model(self, name: str, *, raise_errors: bool = True) -> None:
        """(Re)load a model: every version its policy selects. A failed load keeps what served before.

        The load runs to its end even if the caller goes away (a LoadModel whose deadline passes during
        a minutes-long compile, a cancelled poller): a load cut short would leave a version LOADING for
        good, with its instances holding the device. A load asked for while one of the same model is in
        flight joins it (a client retrying a LoadModel whose deadline passes would otherwise queue one
        full reload, a recompile, per retry)."""
        check_model_name(name)
        if self.draining:  # the poller stops for a drain; a LoadModel must not load (and compile) either
            if raise_errors:
                raise Draining("the server is shutting down; no model loads")
            return
        entry = self.models.get(name)
        task = entry.loading if entry is not None else self._first_loads.get(name)
        if task is None or task.done():
            task = self._start_control(self._load_model(name))
            if entry is not None:
                entry.loading = task
            else:  # (two in one turn of the loop both found no entry, and each loaded the model)
                self._first_loads[name] = task
                task.add_done_callback(lambda t, name=name: self._first_loads.pop(name, None)
                                       if self._first_loads.get(name) is t else None)
        try:
            await asyncio.shield(task)
        except Exception:
            if raise_errors:
                raise

    async def unload_model(self, name: str) -> None:
        """Unload every version of a model; like a load, it runs to its end whatever the caller does."""
        check_model_name(name)
        entry = self.models.get(name)
        if entry is not None:  # a load asked for after this unload runs after it, not joined to one before it
            entry.loading = None
        await asyncio.shield(self._start_control(self._unload_model(name)))

    def _start_control(self, coro) -> asyncio.Task[None]:
        """A load or unload as a task of its own: it runs to its end even if its caller goes away."""
        task = asyncio.ensure_future(coro)
        self._control_tasks.add(task)
        task.add_done_callback(_settle_control_task)
        task.add_done_callback(self._control_tasks.discard)
        return task

    async def _load_model(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None:
            found = self._scan()  # (no await before the entry exists: a second LoadModel joins this load)
            if name not in found:
                raise ModelNotFound(f"model {name!r} is not in the repository")
            entry = self.models[name] = ModelEntry(name, found[name])
            entry.loading = asyncio.current_task()  # a second load of this new model joins this one
        async with entry.lock:
            if not await asyncio.to_thread(entry.path.is_dir):
                # moved or removed since the last scan (explicit mode scans at start only): read the
                # repositories again; a fingerprint of the gone folder failed as an INTERNAL error
                found = await asyncio.to_thread(self._scan)
                if name not in found:
                    raise ModelNotFound(f"model {name!r} is not in the repository (its folder {entry.path} is gone)")
                entry.path, entry.fingerprint = found[name], None
            try:
                # first: a model that fails to read is tried again when its files change, not every poll
                # (what each runtime serves is its own `files`: a failed load here changes none of them)
                entry.fingerprint = await asyncio.to_thread(repository.fingerprint, entry.path)
                settings = await asyncio.to_thread(repository.read_settings, entry.path,
                                                   default_max_queue_size=self.config.max_queue_size)
                wanted = settings.version_policy.select(repository.versions_on_disk(entry.path))
            except Exception as err:  # a broken model fails alone (a backend's import, a malformed file)
                entry.error = err.message if isinstance(err, VideoGenError) else f"{type(err).__name__}: {err}"
                log.error("model %s not loaded: %s", name, entry.error, exc_info=not isinstance(err, VideoGenError))
                self._publish(entry)
                self._notify()
                raise
            if not wanted:
                # its last version folder deleted (or a policy naming none on disk): nothing of it is served
                # any more, as when the model's folder goes (its versions kept serving, READY, for good)
                err = ConfigError(str(settings.config_path), "version_policy", "selects no version folder on disk")
                log.error("model %s not loaded: %s%s", name, err.message,
                          "; unloading the versions it served" if entry.loaded else "")
                await self._unload_versions(entry, error=err.message)
                raise err
            entry.error = ""
            # a version that failed before and is no longer wanted (gone from disk, or past the policy) is
            # forgotten: its ready 0 would page for good
            entry.failed = {v: r for v, r in entry.failed.items() if v in wanted}
            old = dict(entry.loaded)
            new: dict[int, ModelRuntime] = {}
            for version in wanted:
                if self._unchanged(entry, version, settings):  # poll mode: what changed reloads
                    new[version] = old[version]
                    continue
                rt = ModelRuntime(settings, version, self)
                entry.loaded.setdefault(version, rt)  # visible as LOADING if it is new
                self._publish(entry)
                self._notify()  # health as ServerReady: a new model loading is not ready (strict readiness)
                try:
                    log.info("loading %s version %d", name, version)
                    rt.files = entry.fingerprint.version(version)
                    await rt.load()
                    new[version] = rt
                    entry.failed.pop(version, None)
                    log.info("%s version %d ready", name, version)
                except Exception as err:
                    # a backend's refusal of the configuration is said as it is, without a traceback
                    expected = isinstance(err, (VideoGenError, ModelSettingError))
                    reason = (err.message if isinstance(err, VideoGenError) else str(err) if expected
                              else f"{type(err).__name__}: {err}")
                    log.error("%s version %d failed to load: %s", name, version, reason, exc_info=not expected)
                    entry.failed[version] = reason
                    if not rt.instances:  # failed before starting any (those that started, load() stopped)
                        self._forget(rt)
                    if version in old:  # keep serving what was there
                        new[version] = old[version]
                    elif entry.loaded.get(version) is rt:
                        del entry.loaded[version]
            if old and all(v in entry.failed for v in wanted):
                # nothing the policy wants loaded (a failed rollout, e.g. `latest: 1` and a broken new
                # version): keep serving what was there, as Triton does
                new = {**old, **new}
            if not new and entry.failed:
                entry.error = "; ".join(f"version {v}: {r}" for v, r in entry.failed.items())
            if any(new.get(v) is not old.get(v) for v in new):  # a failed reload keeps the old settings
                entry.settings = settings
            entry.loaded = dict(new)
            self._notify()
            retired = [rt for v, rt in old.items() if new.get(v) is not rt]
            await asyncio.gather(*(rt.unload(self.config.unload_timeout_seconds) for rt in retired))
            self._publish(entry)  # after the unloads: a retired runtime of the same version shared the labels
            for rt in new.values():
                rt.scheduler.report_depth()
            failed = {v: entry.failed[v] for v in wanted if v in entry.failed}
            if failed:
                raise NotReady(f"model {name!r} failed to load: "
                               + "; ".join(f"version {v}: {r}" for v, r in failed.items()))

    def _unchanged(self, entry: ModelEntry, version: int, settings: ModelSettings) -> bool:
        """Poll mode: `version` serves from the files on disk now (the fingerprint its runtime loaded
        from), with the settings this load would give it (config.pbtxt, and the defaults read from the
        highest version served), and its last reload did not fail: a change to another version (one
        added or removed) leaves it serving instead of reloading it. Compared with what the runtime
        loaded, not with the last fingerprint taken: new weights seen by a load that then failed (a
        broken config.pbtxt) were taken as loaded, and served never. LoadModel (explicit mode) reloads
        every version it selects, as asked."""
        if self.config.model_control_mode != "poll" or entry.fingerprint is None:
            return False
        rt = entry.loaded.get(version)
        files = entry.fingerprint.version(version)
        return (rt is not None and rt.state == "READY" and version not in entry.failed
                and rt.settings == settings and files is not None and rt.files == files)

    async def _unload_model(self, name: str) -> None:
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        async with entry.lock:
            await self._unload_versions(entry, error="")

    async def _unload_versions(self, entry: ModelEntry, *, error: str) -> None:
        """Unloads every version of `entry` (its lock held), leaving `error` as the model's reason."""
        runtimes = list(entry.loaded.values())
        for rt in runtimes:
            rt.state = "UNLOADING"
        self._notify()
        await asyncio.gather(*(rt.unload(self.config.unload_timeout_seconds) for rt in runtimes))
        entry.loaded.clear()
        entry.failed.clear()
        entry.error = error
        self._publish(entry)
        self._notify()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.repository_poll_seconds)
            try:
                found = await asyncio.to_thread(self._scan)
            except Exception:
                log.exception("repository poll failed")
                continue
            for name, path in found.items():  # one model's trouble does not hold up the others
                try:
                    entry = self.models.get(name)
                    if entry is not None and entry.path != path:  # e.g. gone from the first repository of two
                        log.info("model %s is now read from %s (was %s)", name, path, entry.path)
                        entry.path, entry.fingerprint = path, None
                    if entry is None or await asyncio.to_thread(repository.fingerprint, path) != entry.fingerprint:
                        log.info("model %s changed on disk; reloading", name)
                        await self.load_model(name, raise_errors=False)
                except Exception:
                    log.exception("repository poll: model %s", name)
            # (a folder that could not be read is not gone: what it serves stays until it can be read)
            for name in [n for n in self.models if n not in found and n not in self._unreadable]:
                try:
                    log.info("model %s left the repository; unloading", name)
                    await self.unload_model(name)
                    del self.models[name]
                    self._notify()  # (health forgets its name)
                except Exception:
                    log.exception("repository poll: unloading model %s", name)

    # -- introspection ----------------------------------------------------------------------------

    def _instance_rows(self):
        for entry in list(self.models.values()):
            for rt in list(entry.loaded.values()):
                yield from rt.instance_rows()

    def compile_artifacts_out(self, name: str, version: int) -> Optional[Path]:
        """Where `videogen-server compile-artifacts` has a version's compile artifacts written (None: serving)."""
        cfg = self.config
        if not cfg.write_compile_artifacts:
            return None
        base = cfg.compile_artifacts_output / name / str(version) if cfg.compile_artifacts_output else \
            self.models[name].path / str(version)
        return base / COMPILE_ARTIFACTS_FOLDER

    def status(self, name: str) -> ModelStatus:
        check_model_name(name)
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        # a version whose reload failed serves its previous load: its reason says so
        versions = [VersionStatus(v, rt.state, rt.reason or (
                        f"a reload failed (the previous load serves): {entry.failed[v]}"
                        if v in entry.failed and rt.state == "READY" else "")) for v, rt in sorted(entry.loaded.items())]
        if self.draining:  # it takes no new request and unloads at the drain's end: a wait for it goes on
            versions = [VersionStatus(v.version, "UNLOADING", "the server is shutting down (draining)")
                        if v.state == "READY" else v for v in versions]
        versions += [VersionStatus(v, "FAILED", r) for v, r in sorted(entry.failed.items()) if v not in entry.loaded]
        states = [v.state for v in versions if v.version in entry.loaded]
        state = ("READY" if "READY" in states else states[-1] if states
                 else "FAILED" if entry.error else "UNAVAILABLE")
        ready = [rt for _, rt in sorted(entry.loaded.items()) if rt.state == "READY"]
        return ModelStatus(name=name, backend=entry.settings.backend if entry.settings else "", state=state,
                           versions=versions, settings=entry.settings,
                           # those serving or about to: not the ones stopped for good (the versions' reasons say so)
                           instances=sum(i.state != "dead" for rt in entry.loaded.values() for i in rt.instances),
                           reason=entry.error,
                           instance_groups=ready[-1].instance_groups if ready else ())

    def list_models(self) -> list[ModelStatus]:
        return [self.status(n) for n in sorted(self.models)]

    def statistics(self, name: str = "", version: Optional[int] = None) -> list[tuple[str, int, StatsSnapshot]]:
        """Cumulative statistics of loaded model versions: (model, version, snapshot), sorted.

        `name` empty: every model; `version` None: every loaded version. A named model that is not in
        the repository raises ModelNotFound; one with no loaded version (or not that version) NotReady.
        """
        check_model_name(name)
        if name and name not in self.models:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        out = [(n, v, rt.stats.snapshot()) for n in sorted(self.models) if not name or n == name
               for v, rt in sorted(self.models[n].loaded.items()) if version is None or v == version]
        if name and not out:
            if version is not None:  # as ModelMetadata answers for a version it does not serve
                raise ModelNotFound(f"model {name!r} has no loaded version {version}")
            raise NotLoaded(f"model {name!r} has no loaded version")
        return out

    # -- requests ---------------------------------------------------------------------------------

    async def generate(self, call: GenerateCall) -> AsyncIterator[EngineEvent]:
        """Admit one request and stream its events. Raises VideoGenError subclasses."""
        request_id = call.request_id or uuid.uuid4().hex
        labels = ("", "")
        t_start = time.monotonic()
        outcome: Optional[BaseException] = None
        record: dict[str, object] = {"request_id": request_id, "model": ""}
        spans = self.tracing.request(call.trace_context)
        if spans.trace_id:
            record["trace_id"] = spans.trace_id
        rt: Optional[ModelRuntime] = None
        req: Optional[EngineRequest] = None
        admitted = False  # queued: from here on the request is counted in flight and must be let go
        phases: dict[str, float] = {}  # exact phase seconds, for the version's statistics
        eta: tuple[Optional[float], Optional[float]] = (None, None)  # told in Accepted, from `admitted_at`
        admitted_at = 0.0
        try:
            check_model_name(call.model)
            record["model"] = call.model
            if self._refusing:
                raise Draining("the server is shutting down")
            entry = self.models.get(call.model)
            if entry is None:
                raise ModelNotFound(f"model {call.model!r} is not in the repository")
            labels = (call.model, "")
            wanted = call.params
            for attempt in range(3):
                rt = entry.select(call.model_version)
                labels = rt.labels
                record["version"] = rt.version  # (a refusal after this point names the version too)
                settings = rt.settings
                params = resolve_params(wanted, settings.defaults, settings.limits)
                _check_frame_bytes(params, call.max_frame_bytes)
                wanted = dataclasses.replace(wanted, seed=params.seed)  # one seed, drawn once
                batching = settings.batching
                level = call.priority or batching.default_priority_level
                if not 1 <= level <= batching.priority_levels:
                    if not call.priority_falls_back:
                        raise InvalidRequest("priority", f"{call.priority} is outside 1..{batching.priority_levels}")
                    level = batching.default_priority_level
                policy = batching.queue_policy
                timeout = policy.default_timeout_s
                # a request may shorten the model's queue timeout, never lengthen it (allow_timeout_override
                # in Triton lets requests shorten it only; here they always may: see README)
                if call.timeout_s and (timeout is None or call.timeout_s < timeout):
                    timeout = call.timeout_s
                rt.reserve_queue_slot()  # counted in flight from here: an unload waits for its preprocessing
                job: Optional[concurrent.futures.Future] = None
                t_prepare = time.monotonic()
                try:
                    job = self._decode.submit(_decode_and_prepare, call.image, settings.limits, params,
                                              rt.live_backend())
                    image, prepared = await asyncio.wrap_future(job, loop=self._loop)
                    prepared_in = time.monotonic() - t_prepare  # (observed once the request is admitted)
                except Exception as err:
                    # a backend finalized under its preprocessing (an unload that timed out waiting) is the
                    # version's departure, not the request's fault: treated as below
                    if isinstance(err, VideoGenError) or rt.state == "READY":
                        raise
                    log.info("request %s: preprocessing ended with the version unloading: %r", request_id, err)
                finally:
                    self._release_slot_after(rt, job)
                    spans.phase("preprocess", t_prepare, time.monotonic())
                if self._refusing:  # a drain may have begun while the image decoded
                    raise Draining("the server is shutting down")
                if rt.state == "READY":
                    break
                # unloaded or replaced meanwhile (a reload): admit it to the version serving now, if any
                if attempt == 2 or entry.select(call.model_version) is rt:
                    raise NotReady(f"model {call.model!r} is {rt.state.lower()}")
            # the gRPC deadline counts from the call's start; the queue timeout from entering the queue
            now = time.monotonic()
            deadline = t_start + call.deadline_s if call.deadline_s is not None else None
            limits = [t for t in (now + timeout if timeout is not None else None, deadline) if t is not None]
            req = EngineRequest(request_id=request_id, model=rt.name, version=rt.version, params=params,
                                image=image, prepared=prepared, priority=level, loop=self._loop,
                                queue_deadline=min(limits) if limits else None, deadline=deadline)
            position, eta = rt.scheduler.submit(req)
            admitted_at = time.monotonic()
            admitted = True
            self.metrics.preprocess.labels(*rt.labels).observe(prepared_in)
            rt.active.add(req)
            rt.update_idle()
            rt.inflight_gauge.inc()
            record.update(version=rt.version, width=params.width, height=params.height, frames=params.num_frames,
                          steps=params.num_inference_steps, decode_chunk_size=params.decode_chunk_size,
                          seed=params.seed, priority=level)
            if eta[1] is not None:  # what the caller was told, beside what happened
                record["estimated_end_s"] = round(eta[1], 4)
            with self._taken_in_time(req, call):
                yield AcceptedEvent(request_id, rt.name, rt.version, position, params, eta)
            async for event in self._stream(req, rt, record, phases, spans):
                with self._taken_in_time(req, call):
                    yield event
        except BaseException as exc:  # GeneratorExit / CancelledError included: the caller went away
            outcome = exc
            if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) and req is not None \
                    and req.ended_by_server is not None:
                # gRPC cancelled a stream the server had ended already (the drain's end: its server stops
                # while a slow reader still holds frames back): the caller hears UNAVAILABLE, not its own cancel
                outcome = req.ended_by_server
            raise
        finally:
            if admitted and req is not None and rt is not None:
                if req.phase is not RequestPhase.DONE:
                    req.cancel()
                    rt.scheduler.remove(req)
                rt.active.discard(req)
                rt.update_idle()
                rt.inflight_gauge.dec()
                rt.scheduler.request_ended(req, whole=outcome is None and req.ran_whole)
            seconds = time.monotonic() - t_start
            if rt is not None:
                rt.stats.finished(ok=outcome is None, seconds=seconds, phases=phases)
                if outcome is None and eta[1] is not None:
                    self.metrics.estimate_error.labels(*rt.labels).observe(time.monotonic() - admitted_at - eta[1])
            # gRPC cancels a call whose deadline passed: the caller reads DEADLINE_EXCEEDED, and so should we
            expired = call.deadline_s is not None and seconds >= call.deadline_s - 0.05  # (its clock started first)
            code, message = self._account(labels, outcome, record, seconds, admitted=admitted, deadline_passed=expired)
            if admitted and req is not None:  # until an instance took it, or until it ended unstarted
                spans.phase("queue", req.enqueued_at, req.started_at or time.monotonic(),
                            {"started": req.started_at is not None})
            spans.end(record, code, message)
            # the exception's traceback holds this frame, whose locals (the call and its image, the decoded
            # image) it would keep in a reference cycle until Python's cyclic collector runs
            outcome = None
            if req is not None:
                req.ended_by_server = None

    @contextlib.contextmanager
    def _taken_in_time(self, req: EngineRequest, call: GenerateCall) -> Iterator[None]:
        """Around each yield of `generate`, for a transport that asked (`call.on_reader_stalled`: Generate,
        whose handler writes each event as it takes it): a consumer that has not come back for the next
        event within --stream-send-timeout-seconds is stuck writing this one (gRPC holds a message back
        until the caller reads). The request ends as the server's doing (`ReaderStalled`): the transport
        is told (it ends the call with that status) and the consumer's task is cancelled, which closes this
        generator and frees what waited for the caller."""
        limit = self.config.stream_send_timeout_seconds
        if not limit or call.on_reader_stalled is None:
            yield
            return
        timer = self._loop.call_later(limit, self._reader_stalled, req, call, asyncio.current_task(), limit)
        try:
            yield
        finally:
            timer.cancel()

    def _reader_stalled(self, req: EngineRequest, call: GenerateCall, consumer: Optional[asyncio.Task],
                        limit: float) -> None:
        log.info("request %s: the caller took no message for %gs (--stream-send-timeout-seconds): ended",
                 req.request_id, limit)
        if req.ended_by_server is None:
            req.ended_by_server = ReaderStalled.after(limit)
        req.cancel()
        assert call.on_reader_stalled is not None
        call.on_reader_stalled(req.ended_by_server)
        if consumer is not None:
            consumer.cancel()

    def _release_slot_after(self, rt: "ModelRuntime", job: Optional[concurrent.futures.Future]) -> None:
        """Gives a request's preprocessing slot back once its job has ended. A caller that went away
        while its image was being worked on leaves the job running on a preprocessing thread (a thread
        cannot be stopped): the slot stays taken until it ends, so admission still counts that work and
        an unload still waits for it before finalizing the backend it uses."""
        if job is None or job.done():
            rt.release_queue_slot()
            return

        def ended(_job: concurrent.futures.Future) -> None:
            try:
                self._loop.call_soon_threadsafe(rt.release_queue_slot)
            except RuntimeError:  # the loop has closed (the server stopped): nothing left to count
                pass

        job.add_done_callback(ended)

    def refused(self, exc: VideoGenError, request_id: str = "", trace_context: tuple[tuple[str, str], ...] = ()) -> None:
        """A request the transport refused before it reached `generate` (malformed: an id it cannot echo,
        an empty model name, an unknown enum value): counted and logged as `generate`'s refusals are,
        with model and version empty. `request_id`: the caller's, when it was a valid one; `trace_context`:
        as `GenerateCall.trace_context`, for the log line's trace id (its span's, when exported)."""
        record: dict[str, object] = {"request_id": request_id or "-", "model": ""}
        if trace_id := logged_trace_id(trace_context):
            record["trace_id"] = trace_id
        self._account(("", ""), exc, record, 0.0, admitted=False)

    def _account(self, labels: tuple[str, str], outcome: Optional[BaseException], record: dict[str, object],
                 seconds: float, *, admitted: bool, deadline_passed: bool = False) -> tuple[str, str]:
        """Counts and logs a request's end; returns its status code's name and caller-safe message."""
        cancelled = False
        if outcome is None:
            code, name = "OK", "success"
        elif cancelled := isinstance(outcome, (GeneratorExit, asyncio.CancelledError, RequestCancelled)):
            code, name = ("DEADLINE_EXCEEDED", "error") if deadline_passed else ("CANCELLED", "cancelled")
        else:
            code = status_name(outcome)
            # rejected: refused at admission, before the caller was told it was accepted (it may go elsewhere);
            # once admitted, a request that does not finish is an error (one dropped from the queue included)
            # (a request that ended unstarted, NotStarted, too: its caller sends it elsewhere)
            name = "rejected" if code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE") \
                and (not admitted or isinstance(outcome, NotStarted)) else "error"
        self.metrics.requests.labels(*labels, name, code).inc()
        record.update(outcome=name, code=code, seconds=round(seconds, 4))
        if outcome is not None and code not in ("OK", "CANCELLED"):
            record["error"] = "the caller's deadline passed" if cancelled else \
                clip(outcome.message, MAX_MESSAGE_BYTES) if isinstance(outcome, VideoGenError) else "internal error"
        if name != "rejected" or self._refusal_log.take(code):
            request_log.info("request %s %s %s", record["request_id"], name, code,
                             extra={"videogen_request": record})
        return code, str(record.get("error", ""))

    async def _next(self, req: EngineRequest, rt: ModelRuntime) -> tuple[float, object]:
        """The next event from the instance and when it was sent (time.monotonic()); enforces the queue
        deadline while still queued."""
        while req.phase is RequestPhase.QUEUED and req.queue_deadline is not None:
            left = req.queue_deadline - time.monotonic()
            try:
                return await asyncio.wait_for(req.events.get(), timeout=max(0.0, left))
            except asyncio.TimeoutError:
                if rt.scheduler.remove(req):
                    req.phase = RequestPhase.DONE
                    raise req.queue_expired() from None
                break  # an instance took it (it may still be gathering its batch): no deadline now
        return await req.events.get()

    async def _stream(self, req: EngineRequest, rt: ModelRuntime, record: dict[str, object],
                      phases: dict[str, float], spans: RequestTrace) -> AsyncIterator[EngineEvent]:
        p = req.params
        m, labels = self.metrics, rt.labels
        timing = {"image_encode": 0.0, "denoise": 0.0, "decode": 0.0}
        video_encode_s = 0.0
        first_frame_s = 0.0

        def first_output() -> None:  # the first frame (or, with FRAME_ENCODING_NONE, video) going out
            nonlocal first_frame_s
            if not first_frame_s:
                now = time.monotonic()
                first_frame_s = now - req.enqueued_at
                m.first_frame.labels(*labels).observe(first_frame_s, exemplar=spans.exemplar)
                spans.event("first_frame", now)

        encoder: Optional[FragmentedMP4Encoder] = None
        offset = 0
        queue_observed = False
        try:
            while True:
                sent_at, event = await self._next(req, rt)
                if req.ended_by_server is not None:
                    # an unload's timeout or the drain's end stopped it (end_active): its events already
                    # queued (a finished request whose slow reader holds its frames back) are not read on
                    # to a success the server said it had cut short
                    raise req.ended_by_server
                if not queue_observed and req.started_at is not None:
                    queue_observed = True
                    m.queue_wait.labels(*labels).observe(req.queue_wait, exemplar=spans.exemplar)
                    record["queue_s"] = round(req.queue_wait, 4)
                if isinstance(event, StepDone):
                    m.denoise_step.labels(*labels).observe(event.seconds)
                    spans.event("step", sent_at, {"step": event.step})
                    yield ProgressEvent(event.step, event.num_steps, time.monotonic() - req.enqueued_at)
                elif isinstance(event, PhaseTiming):
                    timing[event.phase] = timing.get(event.phase, 0.0) + event.seconds
                    if event.phase == "image_encode":  # the batch's encode (event.seconds is this request's share)
                        spans.phase(event.phase, req.started_at or sent_at - event.seconds, sent_at)
                    elif event.phase == "denoise":  # decode: a span per chunk, below
                        spans.phase(event.phase, sent_at - event.seconds, sent_at)
                    if event.phase == "image_encode":
                        m.image_encode.labels(*labels).observe(event.seconds)
                elif isinstance(event, FramesDecoded):
                    m.decode_chunk.labels(*labels).observe(event.decode_s)
                    chunk = {"chunk_index": event.chunk_index, "frames": len(event.frames)}
                    spans.phase("vae_decode", sent_at - event.decode_s, sent_at, chunk)
                    encode_from = time.monotonic()
                    if encoder is None and p.stream_video:
                        encoder = FragmentedMP4Encoder(width=p.width, height=p.height, fps=p.video_fps)
                    # Frames encode in parallel (PIL releases the GIL while compressing) beside the
                    # MP4; the worker meanwhile decodes the next chunk. Each frame goes out as soon as
                    # it and the ones before it are encoded, without waiting for the MP4 fragment (x264
                    # takes longer for a chunk than one PNG does). The MP4 job is queued first, so it
                    # starts at once; with one media thread the frames wait for it, as they did before.
                    video_job = (self._loop.run_in_executor(self._media, _timed, encoder.add, event.frames)
                                 if encoder is not None else None)
                    jobs = [] if p.frame_encoding is FrameEncoding.NONE else [
                        self._loop.run_in_executor(self._media, encode_frame, f, p.frame_encoding, p.jpeg_quality)
                        for f in event.frames]
                    try:
                        for i, job in enumerate(jobs):
                            data = await job
                            first_output()
                            yield FrameEvent(event.start_index + i, event.chunk_index, p.frame_encoding, data,
                                             p.width, p.height)
                        m.frames.labels(*labels).inc(len(event.frames))
                        video, seconds = await video_job if video_job is not None else (b"", 0.0)
                    finally:  # a request ended meanwhile: drop queued jobs, and leave no outcome unread
                        for job in jobs + ([video_job] if video_job is not None else []):
                            job.cancel()  # a queued one never runs; a running one finishes unread
                            job.add_done_callback(_discard)  # runs at once on a finished one
                    video_encode_s += seconds
                    spans.phase("encode", encode_from, time.monotonic(), chunk)
                    first_output()  # a no-op once a frame went out
                    if video:
                        yield VideoEvent(video, offset, False)
                        offset += len(video)
                elif isinstance(event, Finished):
                    # not re-run alone (out of memory in its batch): its times are its batch's
                    batch_size = event.batch_size or req.batch_size
                    req.ran_whole = batch_size == req.batch_size
                    if encoder is not None:
                        t0 = time.perf_counter()
                        finish_from = time.monotonic()
                        tail = await self._loop.run_in_executor(self._media, encoder.finish)
                        video_encode_s += time.perf_counter() - t0
                        spans.phase("mp4_finish", finish_from, time.monotonic())
                        m.video_encode.labels(*labels).observe(video_encode_s)
                        yield VideoEvent(tail, offset, True)
                        offset += len(tail)
                    total = time.monotonic() - req.enqueued_at
                    m.request_latency.labels(*labels).observe(total, exemplar=spans.exemplar)
                    phases.update(timing, queue=req.queue_wait, video_encode=video_encode_s)
                    record.update({f"{k}_s": round(v, 4) for k, v in timing.items()},
                                  video_encode_s=round(video_encode_s, 4), first_frame_s=round(first_frame_s, 4),
                                  peak_memory_bytes=event.peak_memory_bytes, batch_size=batch_size,
                                  instance=req.instance)
                    device = _device_of(rt, req.instance)
                    entry = self.models.get(rt.name)
                    if entry is not None and str(rt.version) in entry.published:  # not a version gone since
                        m.last_peak.labels(*labels, req.instance, device).set(event.peak_memory_bytes)
                        entry.peaks.add((str(rt.version), req.instance, device))
                    yield SummaryEvent(
                        request_id=req.request_id, num_frames=p.num_frames, queue_s=req.queue_wait,
                        image_encode_s=timing["image_encode"], denoise_s=timing["denoise"], decode_s=timing["decode"],
                        video_encode_s=video_encode_s, total_s=total, first_frame_s=first_frame_s,
                        peak_memory_bytes=event.peak_memory_bytes, video_bytes=offset, batch_size=batch_size,
                        device=device)
                    return
                elif isinstance(event, _Failed):
                    raise event.exc
                elif event is CLOSED:
                    if req.is_cancelled():
                        raise RequestCancelled("the request was cancelled")
                    raise BackendError("the backend ended the request without a result")
        finally:
            if not queue_observed:
                # it left the queue unserved (its queue timeout or deadline, its caller gone, handed back
                # by a drain) or ended before its first event: its wait counts too, else the histogram
                # (and the queue-wait alert) never sees waits longer than callers are willing to wait
                m.queue_wait.labels(*labels).observe(req.queue_wait, exemplar=spans.exemplar)
                record["queue_s"] = round(req.queue_wait, 4)
            if encoder is not None:
                # A cancelled request may leave an add/finish running on a media thread: close after it
                # there (the encoder's lock orders them), never here under it.
                try:
                    self._media.submit(encoder.close)
                except RuntimeError:  # the pool is shut down: nothing runs on it any more
                    encoder.close()


def _remove_series(metric, *labels: str) -> None:
    """Removes one labelled series; one never created is fine (prometheus-client < 0.22 raises KeyError)."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _decode_and_prepare(data: bytes, limits, params, backend):
    """Admission's CPU work, on the preprocessing threads: decode the image, then the backend's prepare."""
    image = fit_image(decode_image(data, limits), params)
    return image, backend.prepare(params, image)


def _settle_control_task(task: asyncio.Task) -> None:
    """Reads the outcome of a load or unload whose caller went away: it is logged already."""
    if not task.cancelled():
        task.exception()


def _discard(future) -> None:
    """Reads a media job's outcome that nobody awaits any more (its request ended), so a failure there
    is not logged as an exception never retrieved."""
    if not future.cancelled():
        future.exception()


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _device_of(rt: ModelRuntime, instance: str) -> str:
    for inst in rt.instances:
        if inst.name == instance:
            return inst.device
    return ""
