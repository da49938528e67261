"""Cumulative per-model-version inference statistics (what Triton's ModelStatistics reports).

One `ModelStats` per loaded model version, updated by the engine as requests finish:

- `success` / `fail`: requests that completed / failed (cancelled, rejected by the model's
  checks, timed out in the queue, errors), with their time from arrival to the end;
- for successful requests: `queue` (time waiting for an instance), `compute_input` (image encode),
  `compute_infer` (denoising), `compute_output` (VAE decode and video encoding);
- `inference_count` (successful requests, each row of a batch counted), `execution_count` (batches
  executed by the instances), `last_inference` (ms since the epoch, success or failure).

Requests that never reached a model version (unknown model, server draining) count nowhere.
"""
from __future__ import annotations

import dataclasses
import threading
import time


@dataclasses.dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0

    def plus(self, seconds: float) -> "Duration":
        return Duration(self.count + 1, self.ns + max(0, int(round(seconds * 1e9))))


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


class ModelStats:
    """Thread-safe accumulator (requests finish on the event loop, batches start on worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return self._s

    def executed(self) -> None:
        """An instance started executing one batch."""
        with self._lock:
            self._s = dataclasses.replace(self._s, execution_count=self._s.execution_count + 1)

    def finished(self, *, ok: bool, seconds: float, phases: dict[str, float]) -> None:
        """One request ended. `phases`: queue, image_encode, denoise, decode, video_encode seconds."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            s = self._s
            if ok:
                output = phases.get("decode", 0.0) + phases.get("video_encode", 0.0)
                s = dataclasses.replace(
                    s, inference_count=s.inference_count + 1, success=s.success.plus(seconds),
                    queue=s.queue.plus(phases.get("queue", 0.0)),
                    compute_input=s.compute_input.plus(phases.get("image_encode", 0.0)),
                    compute_infer=s.compute_infer.plus(phases.get("denoise", 0.0)),
                    compute_output=s.compute_output.plus(output))
            else:
                s = dataclasses.replace(s, fail=s.fail.plus(seconds))
            self._s = dataclasses.replace(s, last_inference_ms=now_ms)
