"""How long the model's requests take, measured per request shape and batch size.

The scheduler records each batch it hands out (`BatchRun`): when it started, when its instance was
free again (`execute` returned) and when its last request ended for its caller (frames and video
sent). A batch whose every request succeeded, run as handed out (not re-run alone after running out
of memory), is a sample for its shape (`ResolvedParams.batch_key`) and size. Estimates come only from
the same shape, and only from several samples (one slow run, such as the first of a shape that tuned
cuDNN for it, is not an estimate): what the scheduler decides on them (handing a request back at a
drain, refusing one its deadline would cut) is never decided on a guess. Not thread-safe: the
scheduler's lock guards it.
"""
from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Any, Optional

#: Runs kept per shape and batch size (their median is the estimate), how many an estimate needs, and
#: how many shapes are kept (the least recently run forgotten first).
RUN_SAMPLES = 16
MIN_RUN_SAMPLES = 3
RUN_SHAPES = 64
#: Latest batches whose sizes say how large a shape's batches usually are (few: load changes)
SIZE_SAMPLES = 5


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds from a batch's start until its instance is free and until its last request has ended."""

    busy_s: float
    end_s: float


@dataclasses.dataclass
class BatchRun:
    """One batch from `next_batch` until its instance is done and every request of it has ended."""

    started: float
    rows: list
    busy_s: Optional[float] = None  # set when the instance is done with it
    open_rows: int = 0
    whole: bool = True  # every request succeeded, run in this batch
    ended: float = 0.0

    def __post_init__(self) -> None:
        self.open_rows = len(self.rows)

    @property
    def key(self) -> tuple[Any, ...]:
        return self.rows[0].params.batch_key


class RunTimes:
    def __init__(self) -> None:
        self._runs: collections.OrderedDict[tuple, collections.deque[Estimate]] = collections.OrderedDict()
        # computed as runs come (not at every look-up, under the scheduler's lock): (key, size) -> its
        # medians, and key -> the shortest instance time of one request alone, once enough runs
        self._estimates: dict[tuple, Estimate] = {}
        self._fastest: dict[tuple, float] = {}
        self._sizes: dict[tuple, collections.deque[int]] = {}  # key -> sizes of its latest whole batches

    def add(self, run: BatchRun) -> None:
        """A batch whose instance is done and whose requests have all ended: a sample if it ran whole."""
        if not run.whole or run.busy_s is None:
            return
        shape = (run.key, len(run.rows))
        self._sizes.setdefault(run.key, collections.deque(maxlen=SIZE_SAMPLES)).append(len(run.rows))
        runs = self._runs.pop(shape, None) or collections.deque(maxlen=RUN_SAMPLES)
        runs.append(Estimate(run.busy_s, max(run.busy_s, run.ended - run.started)))
        self._runs[shape] = runs  # the most recently run last
        if len(runs) >= MIN_RUN_SAMPLES:
            self._estimates[shape] = Estimate(statistics.median(r.busy_s for r in runs),
                                              statistics.median(r.end_s for r in runs))
            if shape[1] == 1:
                self._fastest[shape[0]] = min(r.busy_s for r in runs)
        while len(self._runs) > RUN_SHAPES:
            old, _ = self._runs.popitem(last=False)
            self._estimates.pop(old, None)
            if old[1] == 1:
                self._fastest.pop(old[0], None)
            if not any(k == old[0] for k, _ in self._runs):
                self._sizes.pop(old[0], None)

    def batch(self, key: tuple[Any, ...], size: int, *, nearest: bool = False) -> Optional[Estimate]:
        """A batch of `size` requests of shape `key`: the medians of that shape and size's latest runs.
        For a size not measured, one request's (a lower bound: requests run together take at least as
        long as one of them alone), what a decision may rest on; with `nearest` (an estimate to tell a
        caller), the measured size nearest to it. None when the shape is not measured."""
        exact = self._estimates.get((key, size))
        if exact is not None or size == 1 and not nearest:
            return exact
        if not nearest:
            return self._estimates.get((key, 1))
        sizes = sorted((abs(n - size), n) for k, n in self._estimates if k == key)
        return self._estimates[(key, sizes[0][1])] if sizes else None

    def usual_size(self, key: tuple[Any, ...]) -> int:
        """The median size of the latest batches of shape `key` (1 when none): under load, requests of a
        shape arriving while one waits join its batch before it starts."""
        sizes = self._sizes.get(key)
        return int(statistics.median_low(sizes)) if sizes else 1

    def fastest(self, key: tuple[Any, ...]) -> Optional[float]:
        """The shortest time an instance spent on one request of shape `key` run alone, of its latest
        runs: a lower bound on the time to its end whatever its output (the frames' encoding and the
        video, done after or beside the device's work, are not in the shape) and however fast its caller
        reads."""
        return self._fastest.get(key)
