"""The scheduler's dynamic batching with several instances, driven directly from worker threads (the
engine's instance threads do the same: block in next_batch, run, come back)."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from videogen_server.engine.model_config import Batching
from videogen_server.engine.scheduler import Scheduler


def _request(name: str, key=(64, 48, 4, 2, True)):
    cancelled = threading.Event()
    return SimpleNamespace(request_id=name, model="m", priority=1, queue_deadline=None, enqueued_at=time.monotonic(),
                           params=SimpleNamespace(batch_key=key), is_cancelled=cancelled.is_set, phase=None,
                           started_at=None, batch_size=1)


def test_a_request_joins_the_batch_an_instance_is_gathering_not_an_idle_instance():
    """Two instances, max_batch_size 2, a long max_queue_delay. A request arriving while one instance
    gathers a batch of its shape belongs in that batch: an idle instance woken by the same submit must
    not take it as a batch of one (both would then wait out the whole delay). Which woken thread takes
    the lock first is up to the OS, so the race is run many times."""
    delay = 2.0
    for trial in range(12):
        sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=delay), max_batch_size=2)
        batches: list[tuple[float, list[str]]] = []

        def instance() -> None:
            while (batch := sched.next_batch()) is not None:
                batches.append((time.monotonic(), [r.request_id for r in batch]))

        threads = [threading.Thread(target=instance, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        sched.submit(_request("a"))
        time.sleep(0.05)  # one instance holds "a" and waits for a second request of its shape
        sched.submit(_request("b"))
        deadline = time.monotonic() + delay + 2
        while len(batches) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        sched.close()
        for t in threads:
            t.join(5)
        assert [ids for _, ids in batches] == [["a", "b"]], f"trial {trial}: {batches}"
        assert batches[0][0] - t0 < delay / 2, "a full batch goes at once, without waiting out the delay"


def test_a_full_gathering_batch_leaves_the_rest_to_the_idle_instance():
    """Requests of the gathering batch's shape beyond its room go to the other instance once that batch
    is full (left to the gathering instance meanwhile, they must not wait for a wake-up that never
    comes). Which thread runs when is up to the OS, so the case is run several times."""
    delay = 0.5
    for trial in range(6):
        sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=delay), max_batch_size=2)
        batches: list[list[str]] = []
        gate = threading.Event()

        def instance() -> None:
            while (batch := sched.next_batch()) is not None:
                batches.append([r.request_id for r in batch])
                gate.wait(5)  # both instances stay busy with what they took

        threads = [threading.Thread(target=instance, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        sched.submit(_request("a"))
        time.sleep(0.05)
        for name in ("b", "c"):
            sched.submit(_request(name))
        while len(batches) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        gate.set()
        sched.close()
        for t in threads:
            t.join(5)
        assert sorted(batches) == [["a", "b"], ["c"]], f"trial {trial}: {batches}"
        assert elapsed < delay + 0.4, f"trial {trial}: c waits its own batching delay, no longer ({elapsed:.2f}s)"


def test_preprocessing_admits_what_the_live_instances_can_take():
    """Admission lets max_queue_size + capacity requests preprocess at once; a dead instance takes
    nothing, so it does not count (else requests were preprocessed only to find the queue full)."""
    from videogen_server.engine.engine import ModelRuntime

    def runtime(*states: str) -> SimpleNamespace:
        return SimpleNamespace(instances=[SimpleNamespace(state=s) for s in states],
                               settings=SimpleNamespace(max_batch_size=2))

    assert ModelRuntime.capacity.fget(runtime("ready", "ready")) == 4
    assert ModelRuntime.capacity.fget(runtime("dead", "ready")) == 2
    assert ModelRuntime.capacity.fget(runtime("dead")) == 0
