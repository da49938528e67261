"""The scheduler's dynamic batching with several instances, driven directly from worker threads (the
engine's instance threads do the same: block in next_batch, run, come back)."""
from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import pytest

from videogen_server.engine.model_config import Batching
from videogen_server.engine.request import EngineRequest
from videogen_server.errors import DeadlinePassed, QueueTimeout
from videogen_server.engine.run_times import BatchRun
from videogen_server.engine.scheduler import Scheduler

# These tests time the scheduler's threads against its delays. Run after the integration tests, the process
# holds millions of objects (models, compiled graphs), and a full pass of Python's cyclic collector, which
# stops every thread, took about a second: a batch that went at once was seen 1.1 s late in CI. The suite's
# collector plugin (tests/gc_pauses.py) freezes what lived at the end of the file before this one, so the
# passes here walk only what these tests make.


class _Request(SimpleNamespace):
    """A request as the scheduler sees it; one object is one request (the engine's are compared and
    hashed by identity, as the scheduler needs)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__
    queue_expired = EngineRequest.queue_expired


def _request(name: str, key=(64, 48, 4, 2, True)):
    cancelled = threading.Event()
    return _Request(request_id=name, model="m", priority=1, queue_deadline=None, deadline=None, run=None,
                           enqueued_at=time.monotonic(),
                           params=SimpleNamespace(batch_key=key), is_cancelled=cancelled.is_set, phase=None,
                           started_at=None, batch_size=1)


def test_a_request_joins_the_batch_an_instance_is_gathering_not_an_idle_instance():
    """Two instances, max_batch_size 2, a long max_queue_delay. A request arriving while one instance
    gathers a batch of its shape belongs in that batch: an idle instance woken by the same submit must
    not take it as a batch of one (both would then wait out the whole delay). Which woken thread takes
    the lock first is up to the OS, so the race is run many times. The delay is long, so that "at once"
    and "after the delay" stay apart on a busy machine."""
    delay = 20.0
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
    nothing, so it does not count (else requests were preprocessed only to find the queue full); and
    without dynamic batching an instance takes one request at a time, whatever max_batch_size says."""
    from videogen_server.engine.engine import ModelRuntime

    def runtime(*states: str, batching: bool = True) -> SimpleNamespace:
        return SimpleNamespace(instances=[SimpleNamespace(state=s) for s in states],
                               scheduler=Scheduler(batching=Batching(enabled=batching), max_batch_size=2))

    assert ModelRuntime.capacity.fget(runtime("ready", "ready")) == 4
    assert ModelRuntime.capacity.fget(runtime("dead", "ready")) == 2
    assert ModelRuntime.capacity.fget(runtime("dead")) == 0
    assert ModelRuntime.capacity.fget(runtime("ready", "ready", batching=False)) == 2


class _Recorded(_Request):
    """A queued request whose error and close the scheduler's drain calls (the engine's request posts
    them to the loop)."""

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)

    def close(self) -> None:
        self.closed = True


def _sized(name: str, frames: int = 4, steps: int = 2, priority: int = 1, deadline: float | None = None):
    """A request of a shape (`batch_key`) the run times are kept by."""
    params = SimpleNamespace(batch_key=(64, 48, frames, steps, True))
    return _Recorded(request_id=name, model="m", priority=priority, queue_deadline=None, deadline=deadline, run=None,
                     enqueued_at=time.monotonic(), params=params, is_cancelled=lambda: False, phase=None,
                     started_at=None, batch_size=1, errors=[], closed=False)


def _measured(sched: Scheduler, *seconds: float, frames: int = 4, steps: int = 2, size: int = 1) -> None:
    """Runs of a batch of `size` requests of a shape, each ending `seconds` after its start (its instance
    free then too), as the scheduler records them."""
    for s in seconds:
        run = BatchRun(0.0, [_sized("done", frames, steps) for _ in range(size)], busy_s=s, ended=s)
        run.open_rows = 0
        sched.run_times.add(run)


def test_a_batch_is_a_sample_once_its_instance_is_done_and_each_request_ended_whole():
    """A batch of two: one request ends for its caller before the instance is done with the other (the
    backend decodes row after row), which is the usual order; the batch is a sample when both have
    ended and the instance is done, whatever the order. A batch with a request that did not end whole
    (failed, cancelled, re-run alone after running out of memory) is none. Three runs make an estimate."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2)
    key = _sized("x").params.batch_key
    for run in range(4):
        rows = [_sized(f"r{run}a"), _sized(f"r{run}b")]
        for req in rows:
            sched.submit(req)
        batch = sched.next_batch()
        assert batch == rows
        sched.request_ended(rows[0], whole=True)  # its video sent while the instance decodes the other
        sched.batch_done(batch)
        sched.request_ended(rows[1], whole=run != 3)  # the fourth batch: one request failed
        expected = None if run < 2 else 3
        assert (sched.run_times.batch(key, 2) is not None) == (expected is not None), run
    assert sched.run_times.batch(key, 1) is None and sched.run_times.fastest(key) is None
    assert not sched._running and not any(r.run for r in rows)  # nothing kept once over
    sched.close()


def test_a_drain_hands_back_at_once_what_would_not_finish_in_its_grace():
    """One instance running a request of a shape measured at 2 s (0.5 s in), four more of that shape
    queued, and a shorter shape measured at 0.2 s behind them, with 4 s of grace left: the first queued
    one ends 3.5 s in and stays; the next three would end after the grace and are handed back now,
    marked not started; the short one fits where they would have run and stays. A shape not measured
    (the last) is never handed back on a guess."""
    from videogen_server.errors import NotStarted

    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 0.2, 0.2, 0.2, frames=1, steps=1)
    sched.submit(_sized("running"))
    running = sched.next_batch()
    queued = [_sized(f"q{i}") for i in range(4)] + [_sized("short", frames=1, steps=1), _sized("new", frames=8)]
    for req in queued:
        sched.submit(req)
    now = running[0].started_at + 0.5
    back = sched.finish_by(now + 4.0, why="the test's drain", now=now)
    assert back == 3
    assert [r.request_id for r in queued if r.closed] == ["q1", "q2", "q3"]
    for req in queued[1:4]:
        [err] = req.errors
        assert isinstance(err, NotStarted) and "the test's drain ends before this request would" in err.message
    assert not any(r.errors for r in queued[:1] + queued[4:]) and sched.depth() == 3
    sched.close()


def test_the_earliest_end_holds():
    """An unload's end set first, then a drain's later one (a SIGTERM during a reload): the unload's
    still decides, else its instances would start requests that its end then stops, their work lost."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 0.2, 0.2, 0.2, frames=1, steps=1)
    t = time.monotonic()
    assert sched.finish_by(t + 1.0, why="the unload") == 0  # nothing queued
    assert sched.finish_by(t + 60.0, why="the server's drain") == 0
    late, fits = _sized("late"), _sized("fits", frames=1, steps=1)
    for req in (late, fits):
        sched.submit(req)
    assert sched.next_batch() == [fits]
    assert late.closed and "the unload ends before this request would" in late.errors[0].message
    sched.close()


def test_while_a_drain_lasts_an_instance_starts_nothing_it_would_not_finish():
    """The drain's hand-back assumed the instances free by the estimates; one that takes longer (here,
    the grace is shorter than the queued requests' 2 s by the time the instance comes back) hands each
    such request back as it reaches the queue's head instead of running it and having it stopped at the
    grace's end, its work lost, and still runs what fits (the short request)."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 0.2, 0.2, 0.2, frames=1, steps=1)
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


def test_without_measured_runs_a_drain_hands_nothing_back():
    """Fewer than three runs of the shape (a fresh server; the warm-up is not timed, and one slow first
    run of a shape is no estimate), or runs that did not end whole: every queued request stays and runs,
    as before the estimates (those still queued at the grace's end are handed back then)."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 100.0, 100.0)  # two slow runs: as if nothing fitted in 100 s
    run = BatchRun(0.0, [_sized("cut")], busy_s=100.0, ended=100.0, whole=False)
    run.open_rows = 0
    sched.run_times.add(run)
    queued = [_sized("q0"), _sized("q1")]
    for req in queued:
        sched.submit(req)
    assert sched.finish_by(time.monotonic() + 60, why="the test's drain") == 0
    assert [r.request_id for r in sched.next_batch()] == ["q0"] and not any(r.errors for r in queued)
    sched.close()


def test_a_drain_plans_batches_as_the_instances_take_them():
    """max_batch_size 2, batches of two measured at 2.5 s and one request alone at 2 s, 3 s of grace:
    q0 and q1 go together and fit; q2 and q3 would be the next batch, ending at 5 s, so they are handed
    back; an instance then takes no row that would carry its batch past the end (batches of three are
    not measured: a batch of one's time is the bound, so nothing is decided on a guess)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 2.5, 2.5, 2.5, size=2)
    queued = [_sized(f"q{i}") for i in range(4)]
    for req in queued:
        sched.submit(req)
    assert sched.finish_by(time.monotonic() + 3.0, why="the test's drain") == 2
    assert [r.request_id for r in queued if r.closed] == ["q2", "q3"]
    assert [r.request_id for r in sched.next_batch()] == ["q0", "q1"]
    sched.close()


def test_a_batch_takes_no_row_that_would_carry_it_past_the_drain():
    """Dynamic batching during a drain: batches of two measured at 2 s, one alone at 1 s, 1.5 s left: a
    second row would make the batch end after the grace and stays out; the first runs alone."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2,
                      live_instances=lambda: 2)
    _measured(sched, 1.0, 1.0, 1.0)
    _measured(sched, 2.0, 2.0, 2.0, size=2)
    queued = [_sized("q0"), _sized("q1")]
    for req in queued:
        sched.submit(req)
    t = time.monotonic()
    assert sched.finish_by(t + 1.5, why="the test's drain") == 0  # a batch of one each: both fit
    assert [r.request_id for r in sched.next_batch()] == ["q0"]
    assert sched.depth() == 1 and not queued[1].errors
    sched.close()


def test_the_estimates_follow_the_order_instances_take_the_queue():
    """Two instances. Before a shape is measured only an idle instance's start is known. With one
    instance on a request of a shape not measured, no start is known (it may end at any time). Once that
    one is done: a request of a measured shape (2 s) starts at once on it, and one of priority 1 goes
    before a priority-2 request queued earlier (the order an instance takes the queue)."""
    sched = Scheduler(batching=Batching(priority_levels=2, default_priority_level=2), max_batch_size=1,
                      live_instances=lambda: 2)
    assert sched.submit(_sized("first", frames=8, priority=2)) == (0, (0.0, None))  # an idle instance, no estimate
    [first] = sched.next_batch()
    _measured(sched, 2.0, 2.0, 2.0)
    assert sched.submit(_sized("running", priority=2)) == (0, (0.0, 2.0))  # the other instance, idle
    sched.next_batch()
    assert sched.submit(_sized("second", priority=2)) == (0, (None, None))  # after "first", whenever it ends
    sched.request_ended(first, whole=True)
    sched.batch_done([first])  # not the batch object next_batch returned: nothing happens
    assert sched.submit(_sized("third", priority=2))[1] == (None, None)  # (its instance: up to "first")
    [run] = [r for r in sched._running.values() if r.rows == [first]]
    sched.batch_done(run.rows)  # now its instance is free
    ahead, high = sched.submit(_sized("high", priority=1))
    assert ahead == 0 and high == (0.0, 2.0), high
    ahead, last = sched.submit(_sized("last", priority=2))
    # high now; second and third when "running" and high end (~2 s); last after them
    assert ahead == 3 and abs(last[0] - 4.0) < 0.1 and abs(last[1] - 6.0) < 0.1, last
    sched.close()


def test_an_instance_starts_no_request_its_deadline_would_cut():
    """Runs of a shape that took 2 s, 3 s and 3 s: a request whose deadline is 1 s away when an instance
    is free for it would be stopped by its deadline before even the fastest run ends; it ends at once
    (DEADLINE_EXCEEDED, reason DEADLINE_UNREACHABLE) and the instance takes the next one, whose deadline
    leaves time enough for the fastest run (2.5 s: the median would say no, the fastest says yes)."""
    from videogen_server.errors import DeadlineUnreachable, status_name

    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 2.0, 3.0, 3.0)
    now = time.monotonic()
    cut, ok = _sized("cut", deadline=now + 1.0), _sized("ok", deadline=now + 2.5)
    for req in (cut, ok):
        sched.submit(req)
    assert [r.request_id for r in sched.next_batch()] == ["ok"]
    [err] = cut.errors
    assert isinstance(err, DeadlineUnreachable) and cut.closed and status_name(err) == "DEADLINE_EXCEEDED"
    assert re.search(r"deadline is (0\.\d|1\.0)s away and the fastest of its shape's latest runs took 2\.0s",
                     err.message), err.message
    sched.close()


def test_a_deadline_is_judged_on_the_devices_time_not_the_outputs():
    """Runs of a shape whose instance was done in 0.5 s but whose PNG frames and MP4 reached a slow
    caller 2 s in: a request of that shape with 1 s left (say raw frames, no video, a fast reader) could
    end in time, so it is started; the end a caller is told stays the whole 2 s."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    for _ in range(3):
        run = BatchRun(0.0, [_sized("done")], busy_s=0.5, ended=2.0)
        run.open_rows = 0
        sched.run_times.add(run)
    quick = _sized("quick", deadline=time.monotonic() + 1.0)
    assert sched.submit(quick)[1] == (0.0, 2.0)
    assert sched.next_batch() == [quick] and not quick.errors
    sched.close()


def test_a_caller_is_told_the_nearest_measured_batch_size_a_decision_is_not():
    """Only batches of two of a shape were measured (4 s: a busy server batches everything). A request
    queued alone is told the time of a batch of two (the nearest measured size; an upper bound here),
    but a drain that would end before that does not hand it back on it: a batch of one's time is not
    known, and only a lower bound may decide."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2)
    _measured(sched, 4.0, 4.0, 4.0, size=2)
    alone = _sized("alone")
    assert sched.submit(alone) == (0, (0.0, 4.0))
    assert sched.finish_by(time.monotonic() + 3.0, why="the test's drain") == 0
    assert sched.next_batch() == [alone] and not alone.errors
    sched.close()


def _cancellable(name: str, **kw):
    req = _sized(name, **kw)
    cancelled = threading.Event()
    req.is_cancelled, req.cancel = cancelled.is_set, cancelled.set
    return req


def _in_thread(fn):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    thread.start()
    return thread, out


def test_a_request_whose_caller_goes_while_its_batch_gathers_frees_the_instance():
    """The caller goes away (the engine cancels the request, takes it out, then ends it) while its
    instance gathers a batch for it: the instance stops gathering at once (it waited out the whole
    max_queue_delay for nobody, then ran an empty batch, while a request of another shape waited), and
    nothing holds the gone request (a run kept its batch's images alive for good)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=5.0), max_batch_size=2)
    depths = []
    sched.on_depth = depths.append
    gone = _cancellable("gone")
    sched.submit(gone)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)  # gathering: waits for a second request of its shape
    assert depths[-1] == 1  # it waits to start: counted as waiting while its batch gathers
    gone.cancel()
    assert not sched.remove(gone)  # the engine's cleanup: an instance holds it...
    sched.request_ended(gone, whole=False)
    time.sleep(0.1)
    assert not sched._gathering and depths[-1] == 0  # ...and lets it go at once
    other = _cancellable("other", frames=8)
    sched.submit(other)
    sched.close()  # the instance was waiting for work: close() hands `other` back, the instance ends
    thread.join(5)
    assert out["value"] is None and gone.run is None and not sched._running


def test_a_gathering_batch_that_loses_a_row_says_so_at_once():
    """One of two rows of a gathering batch is cancelled: the depth gauge drops at once, not when the
    batch starts (review of the change)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=5.0), max_batch_size=4)
    depths = []
    sched.on_depth = depths.append
    a, b = _cancellable("a"), _cancellable("b")
    for r in (a, b):
        sched.submit(r)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)
    assert depths[-1] == 2
    b.cancel()
    sched.remove(b)
    time.sleep(0.1)
    assert depths[-1] == 1 and sched._gathering[0].rows == [a]
    sched.close()
    thread.join(5)


def test_a_gathering_batch_starts_in_time_for_its_rows_deadlines():
    """The shape's fastest run alone is 0.8 s, the batch gathers for up to 1 s, a lone request's
    deadline is 1.5 s away: waiting out the delay would leave it 0.5 s, and the instance would refuse
    it (DEADLINE_UNREACHABLE) though it could have finished. The gathering ends by 0.65 s instead, and
    the caller is told so."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=2)
    _measured(sched, 0.8, 0.8, 0.8)
    t0 = time.monotonic()
    req = _sized("due", deadline=t0 + 1.5)
    _, (start, end) = sched.submit(req)
    assert 0.6 <= start <= 0.66 and end <= 1.5, (start, end)
    assert sched.next_batch() == [req] and not req.errors
    assert 0.55 <= time.monotonic() - t0 <= 0.9
    sched.close()


def test_a_row_cancelled_before_its_batch_starts_is_not_in_it():
    """A row whose caller went away (cancelled, not yet taken out) while its batch gathered is not one
    of the batch's rows when it starts: videogen_batch_size and Summary.batch_size count what ran."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.3), max_batch_size=4)
    a, b, c = _cancellable("a"), _cancellable("b"), _cancellable("c")
    for r in (a, b, c):
        sched.submit(r)
    b.cancel()
    batch = sched.next_batch()
    assert batch == [a, c] and a.batch_size == 2 and b.run is None
    sched.batch_done(batch)
    sched.close()


def test_a_queue_deadline_that_is_the_callers_own_says_so():
    """The queue deadline is the earlier of the model's queue timeout and the caller's gRPC deadline:
    a request refused for the second is not told (nor logged as) the model's queue timeout."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    past = time.monotonic() - 1
    own, timed = _sized("own", deadline=past), _sized("timed", deadline=past + 60)
    own.queue_deadline = timed.queue_deadline = past
    for r in (own, timed):
        sched.submit(r)
    kept = _sized("kept")
    sched.submit(kept)
    assert sched.next_batch() == [kept]
    assert type(own.errors[0]) is DeadlinePassed and "caller's deadline" in str(own.errors[0])
    assert type(timed.errors[0]) is QueueTimeout and "queue timeout" in str(timed.errors[0])
    sched.close()


def test_a_lone_request_is_told_it_waits_out_max_queue_delay():
    """One instance gathering up to 2 rows for up to 1 s, batches of this shape usually of one: a request
    arriving alone waits the whole delay before it starts, and is told so (it was told "now", every
    time, and the estimate's error was the delay)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    _, (start, end) = sched.submit(_sized("alone"))
    assert 0.95 <= start <= 1.0 and abs(end - start - 2.0) < 0.01, (start, end)
    sched.close()


def test_the_plan_skips_requests_no_instance_would_start():
    """A queued request whose queue timeout has passed, ahead of one of 2 s with 2.5 s of the drain left:
    the instance drops the first and runs the second, so the drain must not count the first's 2 s and
    hand the second back (it would have finished)."""
    sched = Scheduler(batching=Batching(), max_batch_size=1)
    _measured(sched, 2.0, 2.0, 2.0)
    expired, fits = _sized("expired"), _sized("fits")
    expired.queue_deadline = time.monotonic() - 1
    for req in (expired, fits):
        sched.submit(req)
    assert sched.finish_by(time.monotonic() + 2.5, why="the test's drain") == 0
    assert sched.next_batch() == [fits] and expired.closed and not fits.errors
    sched.close()


def test_a_row_joining_a_batch_is_checked_against_its_deadline():
    """A request whose deadline even the fastest run alone would miss does not ride along in another's
    batch (it stays queued, to be refused when an instance reaches it)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    head, doomed = _sized("head"), _sized("doomed", deadline=time.monotonic() + 1.0)
    for req in (head, doomed):
        sched.submit(req)
    assert sched.next_batch() == [head] and sched.depth() == 1 and not doomed.errors
    sched.close()


def test_a_batch_that_gathered_while_a_drain_began_is_checked_when_it_starts():
    """The drain begins while an instance gathers (up to 1 s): when the gathering ends, a request of 2 s
    would end after the drain's 2.5 s; it is handed back then instead of started."""
    from videogen_server.errors import NotStarted

    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    head = _sized("head")
    sched.submit(head)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)
    assert sched.finish_by(time.monotonic() + 2.4, why="the test's drain") == 0  # nothing queued
    thread.join(0.5 + 1.0)
    assert head.closed and isinstance(head.errors[0], NotStarted)
    sched.close()
    thread.join(5)
    assert out["value"] is None


def test_an_instance_gathering_a_batch_is_busy_in_the_estimates():
    """One instance gathering a batch for up to 1 s, its shape measured at 2 s: a request of another
    shape (also 2 s) is told it starts when that batch ends, ~3 s from now, not at once."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 2.0, 2.0, 2.0, frames=8)
    sched.submit(_sized("gathered"))
    thread, _ = _in_thread(sched.next_batch)
    time.sleep(0.1)
    _, (start, end) = sched.submit(_sized("other", frames=8))
    assert 2.7 <= start <= 3.0 and abs(end - start - 2.0) < 0.01, (start, end)
    sched.close()
    thread.join(5)


def test_a_request_joining_a_gathering_batch_is_told_that_batchs_start():
    """Two instances, batches of up to 4 gathered for up to 1 s, the shape measured at 2 s alone and
    2.5 s in pairs: a request arriving 0.1 s after another of its shape joins that one's gathering batch
    (not the idle instance), so it is told the batch's start, ~0.9 s from now, and its end as a pair,
    ~3.4 s; a request of another shape still goes to the idle instance at once."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=4,
                      live_instances=lambda: 2)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 2.5, 2.5, 2.5, size=2)
    _measured(sched, 2.0, 2.0, 2.0, frames=8)
    sched.submit(_sized("a"))
    thread, _ = _in_thread(sched.next_batch)
    time.sleep(0.1)
    _, (start, end) = sched.submit(_sized("b"))
    assert 0.8 <= start <= 0.9 and abs(end - start - 2.5) < 0.01, (start, end)
    # the idle instance takes it, then waits up to 1 s for more of its shape (batches of it are of one)
    _, (start, end) = sched.submit(_sized("other", frames=8))
    assert 0.95 <= start <= 1.0 and abs(end - start - 2.0) < 0.01, (start, end)
    sched.close()
    thread.join(5)


def test_requests_joining_a_gathering_batch_past_its_preferred_size_are_told_that_batch():
    """A gathering batch waits until it has its preferred size, but takes every queued request of its
    shape up to max_batch_size when its instance wakes: two arriving at once both join a batch of one
    that prefers two, and it starts at once. The estimate gave the second to the idle instance (start
    now, a batch of one's time) though that instance never takes it (review of the change)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0, preferred_batch_sizes=(2,)),
                      max_batch_size=4, live_instances=lambda: 2)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 3.0, 3.0, 3.0, size=3)
    sched.submit(_sized("a"))
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)
    with sched._cv:  # b and c arrive together, before the gathering instance wakes
        for name in ("b", "c"):
            sched._levels[0].append(_sized(name))
        told = sched._plan(time.monotonic())[0]
    assert sorted(r.request_id for r in told) == ["b", "c"]
    for r, (start, end) in told.items():
        assert abs(start - time.monotonic()) < 0.05 and abs(end - start - 3.0) < 0.05, (r.request_id, start, end)
    with sched._cv:
        sched._cv.notify_all()
    thread.join(5)
    assert [r.request_id for r in out["value"]] == ["a", "b", "c"]
    sched.close()


def test_a_caller_is_told_the_time_of_a_batch_as_large_as_its_shapes_usually_are():
    """Under load, requests of a shape arriving while one waits join its batch before it starts: a lone
    request is told the time of a batch as large as that shape's latest few (3 s for two), and once
    the load is gone (five batches of one) that of a batch of one (2 s)."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.0), max_batch_size=2)
    _measured(sched, 2.0, 2.0, 2.0)
    _measured(sched, 3.0, 3.0, 3.0, size=2)
    alone = _sized("alone")
    assert sched.submit(alone)[1] == (0.0, 3.0)
    sched.remove(alone)
    _measured(sched, 2.0, 2.0, 2.0, 2.0, 2.0)
    assert sched.submit(_sized("later"))[1] == (0.0, 2.0)
    sched.close()


def test_a_full_queue_says_when_an_instance_takes_work_again():
    """max_queue_size 1, two instances each running a request of a shape measured at 2 s (one started
    0.5 s before the other) and one queued: the next request is refused with the time until the first
    instance is free, ~1.5 s. An instance running a shape not measured, or past its estimate, could be
    free any moment: no time is told then (callers would all retry at once, and again)."""
    from videogen_server.errors import QueueFull
    from videogen_server.engine.model_config import QueuePolicy

    def refused(sched: Scheduler) -> QueueFull:
        try:
            sched.submit(_sized("refused"))
        except QueueFull as err:
            return err
        raise AssertionError("not refused")

    batching = Batching(queue_policy=QueuePolicy(max_queue_size=1))
    sched = Scheduler(batching=batching, max_batch_size=1, live_instances=lambda: 2)
    assert sched.retry_after() == 0.0  # two idle instances take work at once
    _measured(sched, 2.0, 2.0, 2.0)
    batches = []  # held, as the instances hold theirs (the scheduler knows a batch by its id)
    for name in ("first", "second"):
        sched.submit(_sized(name))
        batches.append(sched.next_batch())
        time.sleep(0.5 if name == "first" else 0)
    sched.submit(_sized("queued"))
    first = min(sched._running.values(), key=lambda run: run.started)
    now = time.monotonic()
    err = refused(sched)
    assert abs(err.retry_after - (first.started + 2.0 - now)) < 0.05, err.retry_after  # ~1.5 s
    assert abs(sched.retry_after() - err.retry_after) < 0.1
    first.started -= 1.6  # now past its 2 s
    assert sched.retry_after() is None
    sched.close()

    sched = Scheduler(batching=batching, max_batch_size=1, live_instances=lambda: 2)
    _measured(sched, 2.0, 2.0, 2.0)
    for req in (_sized("measured"), _sized("new shape", frames=8)):
        sched.submit(req)
        batches.append(sched.next_batch())
    sched.submit(_sized("queued"))
    assert refused(sched).retry_after is None
    sched.close()


def test_a_gathering_batch_starts_before_a_rows_queue_timeout():
    """max_queue_delay 1 s, but a row's queue timeout is 0.4 s: the batch starts before that timeout
    (the engine's queue timer cannot take a row out of a gathering batch), not 0.6 s after it; and
    before the moment another row's deadline goes out of the fastest run's reach (0.8 - 0.5 s): it was
    started at 0.35 s and refused (DEADLINE_UNREACHABLE), though it could have finished."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=1.0), max_batch_size=4)
    _measured(sched, 0.5, 0.5, 0.5)
    t0 = time.monotonic()
    a = _sized("a")
    a.queue_deadline = t0 + 0.4
    late = _sized("late", deadline=t0 + 0.8)  # reachable if it starts by +0.3 s (fastest run 0.5 s)
    sched.submit(a)
    sched.submit(late)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)
    with sched._cv:  # what estimates see: the batch starting by a's timeout, not at the end of the delay
        [(_, _, start)] = sched._busy(time.monotonic())
    assert start < t0 + 0.3, start - t0
    thread.join(5)
    assert [r.request_id for r in out["value"]] == ["a", "late"] and a.started_at < t0 + 0.3, a.started_at - t0
    assert not late.errors and not a.errors
    sched.close()


@pytest.mark.parametrize("instances", [2, 1])
def test_a_row_a_drain_cuts_from_a_gathering_batch_goes_where_it_can_finish(instances):
    """One request alone takes 1 s, a batch of two 2 s; a drain with 1.7 s left begins while an instance
    gathers [a, b]: b would carry the batch past the drain's end. With an idle second instance, where it
    fits alone, it goes back to the queue for that one (not handed back to its caller as not started).
    With one instance, behind [a] it would end after the drain: it is handed back at once (to be sent
    elsewhere), not when a's batch ends."""
    from videogen_server.errors import NotStarted

    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.5), max_batch_size=4,
                      live_instances=lambda: instances)
    _measured(sched, 1.0, 1.0, 1.0)
    _measured(sched, 2.0, 2.0, 2.0, size=2)
    a, b = _sized("a"), _sized("b")
    sched.submit(a)
    sched.submit(b)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.1)  # an instance holds [a, b] until +0.5 s
    sched.finish_by(time.monotonic() + 1.7, "the test's drain")
    thread.join(5)
    assert out["value"] == [a]
    if instances == 2:
        assert not b.errors and sched.depth() == 1
        assert sched.next_batch() == [b]  # the other instance
    else:
        [err] = b.errors
        assert isinstance(err, NotStarted) and b.closed and sched.depth() == 0
    sched.close()


def test_closing_while_an_instance_gathers_returns_its_rows_unstarted():
    """A close (a drain's end, an unload) while an instance gathers [a, b]: both come back with the
    queue (the engine ends them not started: the SDK sends them elsewhere) and the instance gets none."""
    sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=2.0), max_batch_size=4)
    a, b = _sized("a"), _sized("b")
    sched.submit(a)
    thread, out = _in_thread(sched.next_batch)
    time.sleep(0.2)
    sched.submit(b)  # joins the gathering batch
    time.sleep(0.2)
    assert sorted(r.request_id for r in sched.close()) == ["a", "b"]
    thread.join(5)
    assert out == {"value": None}


def test_a_queue_timeout_of_centuries_leaves_every_instance_serving():
    """timeout_microseconds is a uint64 (the SDK's queue_timeout a float): a caller may ask for centuries.
    An idle instance that finds such a request left to another instance's gathering batch waits until
    the earliest queue timeout, and threading's waits raise OverflowError past threading.TIMEOUT_MAX,
    which ended that instance's thread for good (found by a black-box review: 3 instances down to 1).
    Which woken thread takes the lock first is up to the OS, so the race is run many times."""
    failures: list[BaseException] = []
    for trial in range(8):
        sched = Scheduler(batching=Batching(enabled=True, max_queue_delay_s=0.15), max_batch_size=3)
        batches: list[list[str]] = []

        def instance() -> None:
            try:
                while (batch := sched.next_batch()) is not None:
                    batches.append([r.request_id for r in batch])
            except BaseException as exc:  # noqa: BLE001 - what would have ended an instance's thread
                failures.append(exc)

        threads = [threading.Thread(target=instance, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        sched.submit(_request("a"))
        time.sleep(0.03)  # one instance gathers [a]; the other waits for work
        b = _request("b")
        b.queue_deadline = time.monotonic() + 1e10  # ~317 years: past threading.TIMEOUT_MAX (~292)
        sched.submit(b)  # left to the gathering instance; both instances wake
        time.sleep(0.3)
        sched.submit(_request("c", key=(32, 32, 2, 2, True)))  # the idle instance must still take work
        time.sleep(0.5)  # it gathers [c] for 0.15 s, then starts it
        sched.close()
        for t in threads:
            t.join(5)
        assert not failures, f"trial {trial}: {failures[0]!r}"
        assert sorted(map(sorted, batches)) == [["a", "b"], ["c"]], f"trial {trial}: {batches}"
