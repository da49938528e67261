"""The stall watchdog's part in one instance (`Instance.running` / `stalled_for` / `retire`): what
counts as progress, and a retired instance whose call returns after all takes no more work. The
integration test (tests/integration/test_faults.py) retires a real server's instance whose call never
returns; this one needs a call that returns when told, so the backend here is a stand-in that blocks
on an event (no model: the instance's thread and the scheduler are the real ones)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

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
            for r in requests:
                r.sender.send("a step")
            entered.set()
            release.wait(30)

        def finalize(self) -> None:
            finalized.set()

    scheduler = Scheduler(batching=Batching(), max_batch_size=1)
    dead: list[Instance] = []
    instance = Instance(backend_cls=Stuck, context=InstanceContext("m", 1, Path("."), {}, "cpu", 0, 1),
                        scheduler=scheduler, warmup=[], on_busy=lambda n: None, on_batch=lambda b: None,
                        on_dead=dead.append)
    instance.start().result(10)
    assert instance.running == []
    first, second = _request("first"), _request("second")
    scheduler.submit(first)
    assert entered.wait(10)
    batch = instance.running
    assert batch == [first]
    # progress is the batch's last event, not its start
    assert instance.stalled_for(batch, first.last_sent + 100) == 100
    assert not instance.retire([first])  # not the batch running (another list): nothing happens
    assert instance.retire(batch) and instance.state == "dead" and instance.retired
    assert not instance.retire(batch)  # once
    scheduler.abandon(batch)
    scheduler.submit(second)
    release.set()  # the call returns after all
    instance.finished.result(10)  # its thread ended without taking the queued request
    assert finalized.is_set() and first.closed and not first.errors
    assert instance.state == "dead" and dead == []  # (the watchdog, not the thread, reports a retirement)
    assert scheduler.close() == [second]
