"""Long pauses of Python's cyclic garbage collector in the test process: recorded, reported, made rarer.

A full pass stops every Python thread of the process, the in-process test servers' included, while
gRPC's core keeps its deadlines' clocks running in C. Late in a run such a pass was measured at up to
~2 s (twenty-second session: 54 full passes in the suite's first 230 tests, 15 of them over 1 s; in a
whole run of the twenty-third, 44 passes of 0.5-1.77 s, most in test_accel's compile tests, one in
test_client's). Two costs add up: the cyclic garbage that torch.compile (Dynamo, FX, Inductor) leaves
(most long passes freed 0.15-0.5 M objects), and walking the whole heap, which a process that imported
torch, diffusers and Triton and compiled models makes large.

So:
- every pass of at least `REPORT_SECONDS` is recorded with the test it fell in; a failing test's
  report shows the passes that fell inside it (section "gc pauses"), and the run's summary says, per
  test file, how many full passes fell in its tests and the longest;
- after a test that compiled anything (Dynamo's counters moved), a full collection runs in that
  test's teardown, where no timing is asserted, instead of in whichever test comes next;
- at the end of each test file (its module-scoped fixtures gone) a full collection runs, then
  `gc.freeze()` moves what survived it (imported modules, caches, session fixtures) out of the
  collector's sight: a later full pass walks only what was made since, where it walked the whole heap
  (a pass in test_accel that freed 1502 objects took 1.08 s). What was frozen and later becomes
  cyclic garbage stays allocated until the process's end: little, in a test run.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

REPORT_SECONDS = 0.5
SUMMARY_ROWS = 15
BETWEEN_TESTS = "(between tests)"  # where a pass outside any test's protocol is filed
_COMPILED = pytest.StashKey[int]()  # _dynamo_compiled() when a test's setup began


@dataclass(frozen=True)
class Pause:
    test: str
    generation: int
    seconds: float
    collected: int
    own: bool = False  # one of this plugin's teardown collections (after a compiling test or a file's last)


def _dynamo_compiled() -> int:
    """What Dynamo has compiled in this process (0 when torch was never imported): frames, which only
    its partial-graph path counts, plus graphs, which fullgraph compiles (all of the server's) count."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    return int(utils.counters["frames"]["total"]) + int(utils.counters["stats"]["unique_graphs"])


def _full_collection() -> bool:
    """gc.collect(), which does nothing (returns 0 at once) while another thread's pass is running its
    finalizers; retried for up to ~2 s. Whether a full pass of this thread's ran."""
    for _ in range(40):
        before = gc.get_stats()[2]["collections"]
        gc.collect()
        if gc.get_stats()[2]["collections"] > before:
            return True
        time.sleep(0.05)
    return False


class GcPauses:
    def __init__(self) -> None:
        self.pauses: list[Pause] = []
        self.full: dict[str, list[float]] = {}  # test file -> its tests' full passes (seconds)
        self.teardown: list[float] = []  # this plugin's own collections (seconds)
        self.test = BETWEEN_TESTS
        self._started: Optional[float] = None
        self._collecting_thread: Optional[int] = None  # while this plugin collects: its thread

    # gc.callbacks run on whichever thread triggered the collection, with the collector's lock held
    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        own = threading.get_ident() == self._collecting_thread
        if own:
            self.teardown.append(seconds)
        elif info["generation"] == 2:
            self.full.setdefault(self.test.split("::")[0], []).append(seconds)
        if seconds >= REPORT_SECONDS:
            self.pauses.append(Pause(self.test, info["generation"], seconds, info["collected"], own))

    def pytest_configure(self, config: pytest.Config) -> None:
        gc.callbacks.append(self._callback)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        gc.unfreeze()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
        self.test = item.nodeid
        yield
        self.test = BETWEEN_TESTS

    @pytest.hookimpl(tryfirst=True)  # before pytest's own, which sets up the test's fixtures
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        item.stash[_COMPILED] = _dynamo_compiled()

    # trylast: after pytest's own teardown (the test's fixtures, its servers and compiled models, are gone,
    # and at a file's end the file's own), inside output capture, and before pytest looks for exceptions
    # that finalizers raised (trylast too, registered earlier): what the collection's finalizers say is
    # this test's
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
        last_of_file = nextitem is None or nextitem.path != item.path
        if last_of_file or _dynamo_compiled() != item.stash.get(_COMPILED, 0):
            self._collecting_thread = threading.get_ident()
            try:
                collected = _full_collection()
            finally:
                self._collecting_thread = None
            if last_of_file and collected:  # (never freeze garbage a pass did not get to)
                gc.freeze()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if report.when != "call" or report.passed:
            return
        mine = [p for p in self.pauses if p.test == item.nodeid and not p.own]
        if mine:
            report.sections.append(("gc pauses", "\n".join(
                f"generation {p.generation} pass: {p.seconds:.2f} s, {p.collected} objects freed"
                f" (every Python thread of this process stopped meanwhile)" for p in mine)))

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        if self._callback in gc.callbacks:  # recording ends here: no pass may change what is summed below
            gc.callbacks.remove(self._callback)
        write = terminalreporter.write_line
        passes = [s for file, seconds in self.full.items() if file != BETWEEN_TESTS for s in seconds]
        long = [p for p in self.pauses if not p.own]
        write(f"gc: {len(passes)} full passes in tests, {len(long)} pauses >= {REPORT_SECONDS} s"
              + (f" (longest {max(p.seconds for p in long):.2f} s)" if long else "")
              + f"; {len(self.teardown)} teardown collections"
              + (f" ({sum(self.teardown):.1f} s in all, longest {max(self.teardown):.2f} s)" if self.teardown else "")
              + f"; {gc.get_freeze_count()} objects frozen")
        for file, seconds in self.full.items():
            if max(seconds) >= REPORT_SECONDS:
                write(f"  {file}: {len(seconds)} full passes, {sum(s >= REPORT_SECONDS for s in seconds)}"
                      f" >= {REPORT_SECONDS} s, longest {max(seconds):.2f} s")
        for p in sorted(long, key=lambda p: -p.seconds)[:SUMMARY_ROWS]:
            write(f"  {p.seconds:5.2f} s  gen {p.generation}  {p.collected:>8} freed  {p.test}")
