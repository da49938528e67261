"""The scheduler's dynamic batching with several instances, driven directly from worker threads (the
engine's instance threads do the same: block in next_batch, run, come back)."""
from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

from videogen_server.engine.model_config import Batching
from videogen_server.engine.scheduler import Scheduler


def _request(name: str, key=(64, 48, 4, 2, True)):
    cancelled = threading.Event()
    return SimpleNamespace(request_id=name, model="m", priority=1, queue_deadline=None, deadline=None,
                           enqueued_at=time.monotonic(),
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


class _Recorded(SimpleNamespace):
    """A queued request whose error and close the scheduler's drain calls (the engine's request posts
    them to the loop)."""

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)

    def close(self) -> None:
        self.closed = True


def _sized(name: str, frames: int = 4, steps: int = 2, priority: int = 1, deadline: float | None = None):
    """A request of a real ResolvedParams' shape fields (the run-time estimate reads them)."""
    params = SimpleNamespace(width=64, height=48, num_frames=frames, num_inference_steps=steps, guided=True,
                             batch_key=(64, 48, frames, steps, True))
    return _Recorded(request_id=name, model="m", priority=priority, queue_deadline=None, deadline=deadline, enqueued_at=time.monotonic(),
                     params=params, is_cancelled=lambda: False, phase=None, started_at=None, batch_size=1,
                     errors=[], closed=False)


def _timed_once(sched: Scheduler, seconds: float) -> None:
    """One request of the default shape run to its end in `seconds`: the scheduler's run-time sample."""
    sched.submit(_sized("sample"))
    batch = sched.next_batch()
    sched.batch_done(batch, seconds, ran_to_end=True)


def test_a_drain_hands_back_at_once_what_would_not_finish_in_its_grace():
    """One instance running a request timed at 2 s (0.5 s in), four more of that shape queued, and a
    one-frame one-step request (a tenth of the work) behind them, with 4 s of grace left: the first
    queued one ends 3.5 s in and stays; the next three would end after the grace and are handed back
    now, marked not started; the short one fits where they would have run and stays."""
    from videogen_server.errors import NotStarted

    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _timed_once(sched, 2.0)
    sched.submit(_sized("running"))
    running = sched.next_batch()
    queued = [_sized(f"q{i}") for i in range(4)] + [_sized("short", frames=1, steps=1)]
    for req in queued:
        sched.submit(req)
    now = running[0].started_at + 0.5
    back = sched.finish_by(now + 4.0, why="the test's drain", now=now)
    assert back == 3
    assert [r.request_id for r in queued if r.closed] == ["q1", "q2", "q3"]
    for req in queued[1:4]:
        [err] = req.errors
        assert isinstance(err, NotStarted) and "the test's drain ends before this request would" in err.message
    assert not queued[0].errors and not queued[4].errors and sched.depth() == 2
    sched.close()


def test_while_a_drain_lasts_an_instance_starts_nothing_it_would_not_finish():
    """The drain's hand-back assumed the instances free by the estimates; one that takes longer (here,
    the grace is shorter than the queued requests' 2 s by the time the instance comes back) hands each
    such request back as it reaches the queue's head instead of running it and having it stopped at the
    grace's end, its work lost, and still runs what fits (the short request)."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _timed_once(sched, 2.0)
    queued = [_sized("q0"), _sized("q1"), _sized("short", frames=1, steps=1)]
    for req in queued:
        sched.submit(req)
    # kept at the drain's start: as of 10 s ago, an idle instance had time for all three
    t = time.monotonic()
    assert sched.finish_by(t + 1.5, why="the test's drain", now=t - 10) == 0
    batch = sched.next_batch()  # now: 1.5 s left, 2 s needed
    assert [r.request_id for r in batch] == ["short"]
    assert [r.request_id for r in queued if r.closed] == ["q0", "q1"] and sched.depth() == 0
    sched.close()


def test_without_a_timed_batch_a_drain_hands_nothing_back():
    """No batch has run to its end yet (a fresh server; the warm-up is not timed), so nothing is known of
    the run time: every queued request stays and runs, as before the estimate (those still queued at the
    grace's end are handed back then). A batch that was cancelled or failed is no sample either."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    sched.submit(_sized("cut"))
    sched.batch_done(sched.next_batch(), 100.0, ran_to_end=False)  # (as a sample: nothing fits in 100 s)
    queued = [_sized("q0"), _sized("q1")]
    for req in queued:
        sched.submit(req)
    assert sched.finish_by(time.monotonic() + 60, why="the test's drain") == 0
    assert [r.request_id for r in sched.next_batch()] == ["q0"] and not any(r.errors for r in queued)
    sched.close()


def test_a_batch_takes_no_row_that_would_carry_it_past_the_drain():
    """Dynamic batching during a drain: a second row that would make the batch end after the grace stays
    out (and is handed back at the head of the queue), the first runs alone."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2,
                      live_instances=lambda: 2)
    _timed_once(sched, 1.0)
    queued = [_sized("q0"), _sized("q1")]
    for req in queued:
        sched.submit(req)
    t = time.monotonic()
    assert sched.finish_by(t + 1.5, why="the test's drain") == 0  # one each: both fit
    assert [r.request_id for r in sched.next_batch()] == ["q0"]  # q0 + q1 as one batch: 2 s
    assert sched.depth() == 1 and not queued[1].errors
    sched.close()


def test_the_estimates_follow_the_order_instances_take_the_queue():
    """Two instances, both running requests timed at 2 s (the second just taken by the idle instance,
    whose estimate said so), one queued at priority 2: it starts when the first instance frees up. A
    priority-1 request admitted after it goes first (the order an instance takes the queue). Nothing is
    estimated before a batch was timed."""
    sched = Scheduler(batching=Batching(priority_levels=2, default_priority_level=2), max_batch_size=1,
                      live_instances=lambda: 2)
    assert sched.submit(_sized("first")) == (0, None)  # nothing timed yet
    sched.batch_done(sched.next_batch(), 2.0, ran_to_end=True)
    sched.submit(_sized("running", priority=2))
    sched.next_batch()
    _, second = sched.submit(_sized("second", priority=2))
    assert second[0] == 0 and abs(second[1] - 2.0) < 0.1, second  # the idle instance
    sched.next_batch()
    ahead, low = sched.submit(_sized("low", priority=2))
    assert ahead == 0 and abs(low[0] - 2.0) < 0.1 and abs(low[1] - 4.0) < 0.1, low
    ahead, high = sched.submit(_sized("high", priority=1))
    assert ahead == 0 and abs(high[0] - 2.0) < 0.1 and abs(high[1] - 4.0) < 0.1, high
    ahead, later = sched.submit(_sized("later", priority=1))  # behind high; low is still behind both
    assert ahead == 1 and abs(later[0] - 2.0) < 0.1, later  # the other instance frees up then too
    ahead, last = sched.submit(_sized("last", priority=2))
    assert ahead == 3 and abs(last[0] - 4.0) < 0.1 and abs(last[1] - 6.0) < 0.1, last
    sched.close()


def test_an_instance_starts_no_request_its_deadline_would_cut():
    """Runs timed at 2 s and 3 s: a request whose deadline is 1 s away when an instance is free for it
    would be stopped by its deadline before even the fastest run ends; it ends at once (DEADLINE_EXCEEDED,
    reason DEADLINE_UNREACHABLE) and the instance takes the next one, whose deadline leaves time enough
    for the fastest run (2.5 s: the median would say no, the fastest says yes, so it runs)."""
    from videogen_server.errors import DeadlineUnreachable, status_name

    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _timed_once(sched, 2.0)
    _timed_once(sched, 3.0)
    _timed_once(sched, 3.0)
    now = time.monotonic()
    cut, ok = _sized("cut", deadline=now + 1.0), _sized("ok", deadline=now + 2.5)
    for req in (cut, ok):
        sched.submit(req)
    assert [r.request_id for r in sched.next_batch()] == ["ok"]
    [err] = cut.errors
    assert isinstance(err, DeadlineUnreachable) and cut.closed and status_name(err) == "DEADLINE_EXCEEDED"
    assert re.search(r"deadline is 0\.\d+s away and the fastest of the latest runs would take 2\.0s", err.message) or \
        re.search(r"deadline is 1\.0s away and the fastest of the latest runs would take 2\.0s", err.message), err.message
    sched.close()
