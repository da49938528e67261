"""The stall watchdog's part in one instance (`Instance.retire_if_stalled`): what
counts as progress, and a retired instance whose call returns after all takes no more work. The
integration test (tests/integration/test_faults.py) retires a real server's instance whose call never
returns; this one needs a call that returns when told, so the backend here is a stand-in that blocks
on an event (no model: the instance's thread and the scheduler are the real ones)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from videogen_server.backends.base import Backend, InstanceContext
from videogen_server.engine.instance import Instance
from videogen_server.engine.model_config import Batching
from videogen_server.engine.request import EngineRequest
from videogen_server.engine.scheduler import Scheduler


class _Request(SimpleNamespace):
    """A request as the instance and the scheduler see it, recording what the instance tells it."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__
    queue_expired = EngineRequest.queue_expired

    def send(self, event) -> None:
        self.last_sent = time.monotonic()

    def error(self, exc) -> None:
        self.errors.append(exc)

    def close(self) -> None:
        self.closed = True


def _request(name: str) -> _Request:
    cancelled = threading.Event()
    return _Request(request_id=name, model="m", priority=1, queue_deadline=None, deadline=None, run=None,
                    enqueued_at=time.monotonic(), params=SimpleNamespace(batch_key=(64, 64, 2, 2, True)),
                    image=None, prepared=None, is_cancelled=cancelled.is_set, phase=None, started_at=None,
                    batch_size=1, instance="", last_sent=0.0, errors=[], closed=False)


def test_a_retired_instance_whose_call_returns_takes_no_more_work():
    entered, release, finalized = threading.Event(), threading.Event(), threading.Event()

    class Stuck(Backend):
        name = "stuck"

        def initialize(self, context) -> None:
            pass

        def execute(self, requests) -> None:
            time.sleep(0.2)  # (its event comes well after the batch's start)
            for r in requests:
                r.sender.send("a step")
            entered.set()
            release.wait(30)

        def finalize(self) -> None:
            finalized.set()

    scheduler = Scheduler(batching=Batching(), max_batch_size=1)
    dead: list[Instance] = []
    busy: list[int] = []
    busy_seconds: list[float] = []
    instance = Instance(backend_cls=Stuck, context=InstanceContext("m", 1, Path("."), {}, "cpu", 0, 1),
                        scheduler=scheduler, warmup=[], on_busy=busy.append, on_batch=lambda b: None,
                        on_dead=dead.append, on_busy_seconds=busy_seconds.append)
    instance.start().result(10)
    assert instance.retire_if_stalled(0.0, time.monotonic()) is None  # idle: nothing to retire
    first, second = _request("first"), _request("second")
    scheduler.submit(first)
    assert entered.wait(10)
    # progress is the batch's last event, not its start (0.2 s before it)
    assert instance.retire_if_stalled(100.0, first.last_sent + 99.9) is None
    batch, stalled = instance.retire_if_stalled(100.0, first.last_sent + 100.5)
    assert batch == [first] and stalled == pytest.approx(100.5) and instance.state == "dead" and instance.retired
    assert instance.retire_if_stalled(100.0, first.last_sent + 200) is None  # once
    assert instance.released.done() and not instance.finished.done()  # what a stop waits for: not its thread
    assert busy == [+1, -1] and len(busy_seconds) == 1  # no longer busy; its time so far counted
    scheduler.abandon(batch)
    scheduler.submit(second)
    release.set()  # the call returns after all
    instance.finished.result(10)  # its thread ended without taking the queued request
    assert finalized.is_set() and first.closed and not first.errors
    assert instance.state == "dead" and dead == []  # (the watchdog, not the thread, reports a retirement)
    assert busy == [+1, -1] and len(busy_seconds) == 1  # the thread counted nothing again
    assert scheduler.close() == [second]


def test_work_re_run_without_its_events_counts_as_progress():
    """The svd backend re-runs a batch's requests one by one after running out of memory, and drops
    the events each sent before (the caller has them): a re-run of many steps sent nothing, and was
    retired as a stall (review). A dropped event is progress still."""
    from videogen_server.backends.base import StepDone
    from videogen_server.backends.svd.backend import _Replay

    class Sender:
        def __init__(self) -> None:
            self.sent, self.progress = [], 0

        def send(self, event) -> None:
            self.sent.append(event)

        def progressed(self) -> None:
            self.progress += 1

    sender = Sender()
    replay = _Replay(sender)  # one per request and execute: the re-run sends through it again
    replay.send(StepDone(1, 2, 0.1))
    replay.send(StepDone(1, 2, 0.1))  # the re-run's step 1
    assert len(sender.sent) == 1 and sender.progress == 1


def test_a_retirement_leaves_a_request_whose_result_went_out():
    """A batch re-run request by request can hang after one request's result went out (its caller may
    still be reading its frames): that request keeps its result; the others end UNAVAILABLE."""
    from videogen_server.engine.engine import ModelRuntime
    from videogen_server.errors import InstanceDead

    done, waiting = _request("done"), _request("waiting")
    done.finished, waiting.finished = True, False
    for r in (done, waiting):
        r.ended_by_server, r.cancel = None, lambda: None
    batch = [done, waiting]
    instance = SimpleNamespace(name="0", retire_if_stalled=lambda limit, now: (batch, 10.0))
    stuck: list = []
    runtime = SimpleNamespace(name="m", version=1, instances=[instance],
                              scheduler=SimpleNamespace(abandon=lambda b: None),
                              _instance_dead=lambda inst: None,
                              _engine=SimpleNamespace(count_stuck=lambda rt, inst: stuck.append(inst)))
    ModelRuntime.retire_stalled(runtime, 5.0)
    assert stuck == [instance] and done.errors == [] and done.ended_by_server is None
    assert [type(e) for e in waiting.errors] == [InstanceDead] and waiting.ended_by_server is waiting.errors[0]


def test_a_retirement_whose_bookkeeping_fails_still_ends_its_requests():
    """The instance is dead once retired, and never looked at again: a failure in what follows (the log,
    the metrics, the version's state) must not leave its requests waiting for their deadlines."""
    from videogen_server.engine.engine import ModelRuntime

    waiting = _request("waiting")
    waiting.finished, waiting.ended_by_server, waiting.cancel = False, None, lambda: None

    def broken(inst) -> None:
        raise RuntimeError("a bug in the bookkeeping")

    runtime = SimpleNamespace(name="m", version=1, _instance_dead=broken,
                              instances=[SimpleNamespace(name="0", retire_if_stalled=lambda l, n: ([waiting], 9.0))],
                              scheduler=SimpleNamespace(abandon=lambda b: None),
                              _engine=SimpleNamespace(count_stuck=lambda rt, inst: None))
    with pytest.raises(RuntimeError, match="bookkeeping"):  # (the watch logs it and goes on)
        ModelRuntime.retire_stalled(runtime, 5.0)
    assert len(waiting.errors) == 1 and waiting.ended_by_server is waiting.errors[0]
