"""Two instances of one version that die together (one lost device under both) report on their own
threads: the gauge must end on the final count, whatever order the threads run in. The fault injection
test (tests/integration/test_faults.py) loses one instance of a real server; two losing their device
at the same moment needs a GPU, so the runtime here is a stand-in holding only what `_instance_dead`
reads, and the interleaving is forced through the gauge."""
from __future__ import annotations

import threading
import types

from videogen_server.engine.engine import ModelRuntime


def test_instances_lost_together_end_on_the_final_count():
    a, b = types.SimpleNamespace(state="ready"), types.SimpleNamespace(state="ready")
    seen: list[float] = []
    b_done = threading.Event()

    class Gauge:
        def set(self, value):
            if not seen:  # the first thread to publish: let the other one run, if it can, before it lands
                seen.append(None)
                b_done.wait(1.0)
            seen.append(value)
            self.value = value

    gauge = Gauge()
    metrics = types.SimpleNamespace(instances_lost=types.SimpleNamespace(labels=lambda *_: gauge),
                                    model_ready=types.SimpleNamespace(labels=lambda *_: gauge))
    runtime = types.SimpleNamespace(
        name="m", version=1, labels=("m", "1"), instances=[a, b, types.SimpleNamespace(state="ready")],
        reason="", state="READY", _dead_lock=threading.Lock(),
        _engine=types.SimpleNamespace(models={}, metrics=metrics))

    a.state = "dead"
    ta = threading.Thread(target=ModelRuntime._instance_dead, args=(runtime, a))
    ta.start()
    while not seen:  # a has counted its loss and is publishing it
        threading.Event().wait(0.01)

    def b_dies():
        b.state = "dead"
        ModelRuntime._instance_dead(runtime, b)
        b_done.set()

    tb = threading.Thread(target=b_dies)
    tb.start()
    ta.join(5)
    tb.join(5)
    assert gauge.value == 2, seen
    assert runtime.reason.startswith("2 of 3 instances stopped for good"), runtime.reason
