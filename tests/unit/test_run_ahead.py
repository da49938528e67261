"""Progress with the host one denoising step ahead of the GPU (svd backend's _RunAhead).

The GPU path waits on CUDA events, which need a GPU: here fake events stand in for them (the only
mock), recording when each is created (after a step's kernels are queued) and waited for. The CPU
path runs for real in every generation test.
"""
from __future__ import annotations

from videogen_server.backends.svd.backend import _RunAhead


class _Log:
    def __init__(self) -> None:
        self.ops: list[str] = []
        self.n = 0

    def mark(self):
        log, k = self, self.n
        self.n += 1
        log.ops.append(f"record {k}")

        class Event:
            def synchronize(self) -> None:
                log.ops.append(f"wait {k}")
        return Event()


def test_gpu_steps_are_reported_after_the_next_one_is_queued_and_all_by_the_end():
    log = _Log()
    progress = _RunAhead(4, log.mark)
    for i in range(4):
        log.ops.append(f"launch {i}")
        for step in progress.launched(i):
            log.ops.append(f"report {step}")
    assert log.ops == [
        "launch 0", "record 0",                                   # step 0 queued; nothing finished is known
        "launch 1", "record 1", "wait 0", "report 0",             # step 1 queued behind 0, then 0 waited for
        "launch 2", "record 2", "wait 1", "report 1",
        "launch 3", "record 3", "wait 2", "report 2", "wait 3", "report 3",  # the last step: waited for too
    ]


def test_one_step_on_a_gpu_and_every_step_at_once_on_a_cpu():
    log = _Log()
    assert list(_RunAhead(1, log.mark).launched(0)) == [0] and log.ops == ["record 0", "wait 0"]
    cpu = _RunAhead(3)  # no events: work is finished when the call returns
    assert [list(cpu.launched(i)) for i in range(3)] == [[0], [1], [2]]
