"""Model lifecycle against requests in flight: reloads and unloads while images are still being
preprocessed, a LoadModel whose caller gives up, load shedding before any image work, device errors
met during conditioning, broken model files. Real servers on port 0; the slow parts come from a
small backend installed through the entry-point group, as a third-party backend would be."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen.v1 import videogen_pb2 as pb

from ..helpers import ServerThread, Stream, collect, install_backend, request, tiny_config

SHORT = dict(num_inference_steps=1, num_frames=1, output={"stream_video": False})

SLOW_BACKEND = '''
import threading
import time

import numpy as np
from videogen_server.backends import Backend, Finished, FramesDecoded, StepDone

GATE = threading.Event()  # tests hold preprocessing here
GATE.set()
EXECUTE = threading.Event()  # and execution here, after the first step is reported
EXECUTE.set()
LOADS = []  # instance starts, in order


class SlowBackend(Backend):
    """Preprocessing waits for GATE and needs state that finalize drops (as the SVD backend's pipeline
    is); initialize takes `init_seconds`, each denoising step `step_seconds`."""

    name = "slow"

    @classmethod
    def validate_parameters(cls, parameters):
        float(parameters.get("init_seconds", "0"))
        float(parameters.get("step_seconds", "0"))

    def initialize(self, context):
        time.sleep(float(context.parameters.get("init_seconds", "0")))
        self.step_seconds = float(context.parameters.get("step_seconds", "0"))
        self.scale = 1
        LOADS.append(context.model_version)

    def prepare(self, params, image):
        GATE.wait(30)
        return self.scale  # AttributeError once finalized

    def execute(self, requests):
        for r in requests:
            p = r.params
            r.sender.send(StepDone(1, 1))
            EXECUTE.wait(30)
            if p.seed == 99:
                raise SystemExit("a backend bug")
            if p.seed == 98:  # torch's, known by name (the engine does not import torch)
                raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB")
            time.sleep(p.num_inference_steps * self.step_seconds)
            frames = np.zeros((p.num_frames, p.height, p.width, 3), np.uint8) + r.prepared
            r.sender.send(FramesDecoded(chunk_index=0, start_index=0, frames=frames))
            r.sender.send(Finished())

    def finalize(self):
        del self.scale
'''


@pytest.fixture
def slow_backend(tmp_path, monkeypatch):
    """Installs the `slow` backend (an entry point of a package on sys.path); returns its module."""
    import sys

    sys.modules.pop("slow_backend_pkg", None)  # a fresh GATE and LOADS for each test
    module = install_backend(tmp_path, monkeypatch, "slow_backend_pkg", "slow", SLOW_BACKEND)
    yield module
    module.GATE.set()
    module.EXECUTE.set()


def slow_repo(tmp_path, extra: str = "", init_seconds: float = 0.0):
    repo = tmp_path / "repo"
    (repo / "a" / "1").mkdir(parents=True)
    (repo / "a" / "config.pbtxt").write_text(
        'name: "a"\nbackend: "slow"\ninstance_group [ { kind: KIND_CPU } ]\n' + extra +
        f'parameters {{ key: "init_seconds" value {{ string_value: "{init_seconds}" }} }}\n'
        'parameters { key: "default_width" value { string_value: "16" } }\n'
        'parameters { key: "default_height" value { string_value: "16" } }\n'
        'parameters { key: "min_width" value { string_value: "16" } }\n'
        'parameters { key: "min_height" value { string_value: "16" } }\n')
    return repo


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def preparing(server, name: str = "a") -> int:
    return sum(rt.preparing for rt in server.engine.models[name].loaded.values())


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_reload_and_unload_while_images_are_preprocessed(tmp_path, slow_backend):
    """A request still in preprocessing when its version is replaced goes to the new version; when the
    model is unloaded it gets UNAVAILABLE (retryable), never INTERNAL; the unload waits for it."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        slow_backend.GATE.clear()
        reloaded = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        wait_until(lambda: preparing(server) == 1)
        old = server.engine.models["a"].loaded[1]
        reload, out = in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a")))
        wait_until(lambda: server.engine.models["a"].loaded[1] is not old)  # the new version serves
        wait_until(lambda: old.state == "UNLOADING")
        time.sleep(0.2)
        assert reload.is_alive() and old.preparing == 1, "the unload of the old waits for preprocessing"
        slow_backend.GATE.set()
        reload.join(30)
        assert "error" not in out, out
        assert reloaded.join().summary.num_frames == 1, reloaded.error
        assert reloaded.responses[0].accepted.model_version == 1

        slow_backend.GATE.clear()
        unloaded = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        wait_until(lambda: preparing(server) == 1)
        current = server.engine.models["a"].loaded[1]
        unload, out = in_thread(lambda: stub.UnloadModel(pb.UnloadModelRequest(name="a")))
        wait_until(lambda: current.state == "UNLOADING")
        time.sleep(0.2)
        assert unload.is_alive(), "the unload waits for the request in preprocessing"
        slow_backend.GATE.set()
        unload.join(30)
        assert "error" not in out, out
        assert unloaded.join().code() == grpc.StatusCode.UNAVAILABLE
        assert server.metric("videogen_requests_total", code="INTERNAL") == 0


def test_a_drain_during_a_reload_waits_for_the_retiring_version(tmp_path, slow_backend):
    """SIGTERM while a reload retires the old version: the drain waits for that version's running
    request as for any other (it looked only at the versions in service: the request was cut after a
    second with 19 s of grace left), then the shutdown stops the old version's instances (its thread
    was left running, its backend never finalized)."""
    repo = slow_repo(tmp_path)
    server = ServerThread(repo, model_control_mode="explicit", load_models=("a",), drain_grace_seconds=20.0).start()
    try:
        stub = server.stub()
        slow_backend.EXECUTE.clear()
        running = Stream(stub, request(model="a", **SHORT))
        assert running.progressed.wait(10)
        old = server.engine.models["a"].loaded[1]
        (repo / "a" / "2").mkdir()
        in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a")))
        wait_until(lambda: list(server.engine.models["a"].loaded) == [2] and old.state == "UNLOADING")
        stopping, out = in_thread(lambda: server.run(server.server.stop(), timeout=60))
        time.sleep(1.5)
        assert stopping.is_alive(), "the drain waits for the retiring version's request"
        slow_backend.EXECUTE.set()
        assert running.join().summary.num_frames == 1, running.error
        stopping.join(60)
        assert "error" not in out, out
        assert not any(inst._thread.is_alive() for inst in old.instances)
        assert not hasattr(old.instances[0].backend, "scale"), "the old version's backend was finalized"
    finally:
        slow_backend.EXECUTE.set()
        server.stop()


# Paced requests: 8 steps of 0.3 s, 2.4 s a request. The two tests below hinge on what happens while
# one runs, and a loaded 2-core machine takes tenths of a second to send the next request: with
# steps of 0.15 s (1.2 s runs) the deadline test failed about 1 run in 20 there.
PACED = 'parameters { key: "step_seconds" value { string_value: "0.3" } }\n'
PACED_WORK = dict(SHORT, num_inference_steps=8)


def timed_runs(stub) -> list[Stream]:
    """Three requests run to their end: the model's run time for their shape is known from then on."""
    return [Stream(stub, request(model="a", **PACED_WORK)).join() for _ in range(3)]


def test_a_request_whose_deadline_would_cut_it_is_not_started(tmp_path, slow_backend):
    """Requests of 6 s (8 steps of 0.75 s), one running, and behind it one whose gRPC deadline is 9 s
    away, then one without a deadline: when the instance is free (~6 s on: the slow backend reports its
    first step as it starts, then sleeps the run) the first has ~3 s left, less than the fastest run; it
    ends then, DEADLINE_EXCEEDED and not started, rather than run until its deadline stops it, and the
    instance goes on to the request behind it. The server's answer has ~3 s to beat the caller's
    deadline, whose clock gRPC's core keeps without Python: a full pass of this process's garbage
    collector stops every Python thread, and such passes took up to ~2 s in the suite (tests/gc_pauses.py).
    At 0.3 s steps and a 3.6 s deadline (~1.2 s to answer in) a clean-clone run once saw the caller's
    deadline first."""
    with ServerThread(slow_repo(tmp_path, extra=PACED.replace('"0.3"', '"0.75"'))) as server:
        stub = server.stub()
        timed_runs(stub)
        running = Stream(stub, request(model="a", **PACED_WORK))
        assert running.progressed.wait(10) and running.error is None
        doomed = Stream(stub, request(model="a", **PACED_WORK), timeout=9.0)
        after = Stream(stub, request(model="a", **PACED_WORK))
        doomed.join(10)
        assert doomed.code() == grpc.StatusCode.DEADLINE_EXCEEDED, doomed.error
        assert "not started" in doomed.error.details(), doomed.error.details()  # the server's words, not gRPC's
        assert after.join().summary.num_frames == 1 and running.join().summary.num_frames == 1
        assert server.metric("videogen_batch_size_count", model="a") == 5  # the doomed one never ran
        assert server.metric("videogen_requests_total", model="a", outcome="error", code="DEADLINE_EXCEEDED") == 1


def test_a_drain_hands_back_at_once_what_it_could_not_finish(tmp_path, slow_backend):
    """Requests of 4 s (8 steps of 0.5 s; three ran to their end, so the run time is known), one
    running, three queued, a drain grace of 9 s: the running request and the first queued one finish
    within it; the two behind would end ~12 s in, so they are handed back at the drain's start, marked
    not started (the SDK sends them to another server at once), where they used to wait out the grace
    and be handed back then; one started late would have been stopped at the grace's end, its work lost.
    The same estimates reach the callers in Accepted: when each request starts and ends. (The drain
    must start within 3 s of the running request: the queueing in between takes a few tenths, which
    leaves room for a ~2 s pause of this process's garbage collector, tests/gc_pauses.py; at 0.3 s steps
    and a 6 s grace the room was 1.2 s.)"""
    server = ServerThread(slow_repo(tmp_path, extra=PACED.replace('"0.3"', '"0.5"')), drain_grace_seconds=9.0).start()
    try:
        stub = server.stub()
        work = PACED_WORK
        for first in timed_runs(stub):
            assert first.summary.num_frames == 1
            assert not first.responses[0].accepted.HasField("estimated_end_seconds"), "fewer than 3 runs before"
        running = Stream(stub, request(model="a", **work))
        assert running.progressed.wait(10) and running.error is None
        queued = []
        for _ in range(3):  # one at a time: each estimate counts the ones before
            queued.append(Stream(stub, request(model="a", **work)))
            assert queued[-1].accepted.wait(10) and queued[-1].error is None
        wait_until(lambda: server.metric("videogen_queue_depth", model="a") == 3)
        started = running.responses[0].accepted
        assert started.estimated_start_seconds == 0 and 3.8 <= started.estimated_end_seconds <= 4.8, started
        # (start, end) of each queued request, in seconds of this process's clock (each estimate counts
        # from its own Accepted, which the streams' threads took in at different times)
        estimates = []
        for stream in queued:
            accepted, at = stream.responses[0].accepted, stream.times[0]
            estimates.append((at + accepted.estimated_start_seconds, at + accepted.estimated_end_seconds))
        assert 1.5 <= estimates[0][0] - queued[0].times[0] <= 4.8, estimates  # what the running request had left
        for (start, end), (next_start, _) in zip(estimates, estimates[1:] + [(None, None)]):
            assert 3.8 <= end - start <= 4.8, estimates
            assert next_start is None or abs(next_start - end) < 0.3, estimates  # one after the other
        t0 = time.monotonic()
        assert t0 - running.times[0] < 2.9, "the drain must start before the second queued request fits in its grace"
        stopping, out = in_thread(lambda: server.run(server.server.stop(), timeout=60))
        for stream in queued[1:]:
            stream.join(10)
        handed_back = time.monotonic() - t0
        assert handed_back < 4, f"handed back {handed_back:.1f}s into the drain, not at its start"
        for stream in queued[1:]:
            assert stream.code() == grpc.StatusCode.UNAVAILABLE, stream.error
            assert ("x-videogen-not-started", "1") in stream.error.trailing_metadata()
            assert "the server's drain ends before this request would" in stream.error.details()
        assert running.join().summary.num_frames == 1, running.error
        assert queued[0].join().summary.num_frames == 1, queued[0].error
        stopping.join(30)
        assert "error" not in out, out
        count = server.server.metrics.registry.get_sample_value  # (its /metrics endpoint stopped with it)
        assert count("videogen_requests_total", {"model": "a", "version": "1", "outcome": "rejected",
                                                 "code": "UNAVAILABLE"}) == 2
        assert count("videogen_requests_total", {"model": "a", "version": "1", "outcome": "success",
                                                 "code": "OK"}) == 5
    finally:
        server.stop()


def test_a_stop_during_a_reload_does_not_wait_for_the_new_version_to_load(tmp_path, slow_backend):
    """A load cut short by the shutdown is left to finish on its own threads (a compile: minutes, past
    the orchestrator's stop grace); the stop waits for the versions that served, not for it."""
    init = 6.0
    server = ServerThread(slow_repo(tmp_path, init_seconds=init), model_control_mode="explicit",
                          load_models=("a",), drain_grace_seconds=1.0).start()
    try:
        stub = server.stub()
        in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a")))  # in place: version 1 again
        wait_until(lambda: slow_backend.LOADS == [1] and len(server.engine._runtimes) == 2)
        t0 = time.monotonic()
        server.run(server.server.stop(), timeout=60)
        # (a stop takes tenths; the rest is room for a pause of this process's garbage collector)
        assert time.monotonic() - t0 < init - 2, "the stop waited for the reload's initialize"
    finally:
        server.stop()


def test_an_in_place_reload_keeps_the_version_ready_in_metrics(tmp_path, slow_backend):
    """LoadModel of a loaded model (or the poller after a file change) replaces a version by a new
    runtime of the same number; while the old one finishes its requests, the version serves, and
    videogen_model_ready, which both runtimes' labels name, stays 1 (the old one's unload set it 0).
    videogen_queue_depth, also shared, counts both runtimes' queues (it read 0 while the old one still
    had two requests queued)."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        slow_backend.EXECUTE.clear()
        running = Stream(stub, request(model="a", **SHORT))
        assert running.progressed.wait(10)
        queued = [Stream(stub, request(model="a", **SHORT)) for _ in range(2)]
        for stream in queued:
            assert stream.accepted.wait(10)
        old = server.engine.models["a"].loaded[1]
        reload, out = in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a")))
        wait_until(lambda: server.engine.models["a"].loaded[1] is not old and old.state == "UNLOADING")
        assert server.engine.model_ready("a")
        assert server.metric("videogen_model_ready", model="a", version="1") == 1
        assert server.metric("videogen_queue_depth", model="a", version="1") == 2
        slow_backend.EXECUTE.set()
        assert running.join().summary.num_frames == 1, running.error
        assert all(stream.join().summary.num_frames == 1 for stream in queued)
        reload.join(30)
        assert "error" not in out, out
        assert server.metric("videogen_model_ready", model="a", version="1") == 1
        assert server.metric("videogen_queue_depth", model="a", version="1") == 0


def test_preprocessing_that_outlasts_the_unload_gets_unavailable(tmp_path, slow_backend):
    """An unload that gives up waiting finalizes the backend under a request still in preprocessing;
    whatever that backend's prepare then raises, the request is told the model went away (UNAVAILABLE,
    retryable), not INTERNAL."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",),
                      unload_timeout_seconds=0.2) as server:
        stub = server.stub()
        slow_backend.GATE.clear()
        late = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        wait_until(lambda: preparing(server) == 1)
        stub.UnloadModel(pb.UnloadModelRequest(name="a"))  # returns after the 0.2 s wait, finalized
        slow_backend.GATE.set()
        assert late.join().code() == grpc.StatusCode.UNAVAILABLE
        assert server.metric("videogen_requests_total", code="INTERNAL") == 0


def test_a_request_still_queued_when_the_unload_gives_up_is_handed_back_not_started(tmp_path, slow_backend):
    """An unload that gives up waiting stops the running request (UNAVAILABLE, an error) and hands back the
    one still queued behind it: no instance took it, so its caller hears NotStarted (the trailer the SDK
    resends on) and metrics count a rejection, not an error. It was told it had been stopped (the unload's
    end ran over the queue's own hand-back: engine review, 2026-11-28)."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",),
                      unload_timeout_seconds=0.5) as server:
        stub = server.stub()
        slow_backend.EXECUTE.clear()
        running = Stream(stub, request(model="a", **SHORT))
        assert running.progressed.wait(10)
        queued = Stream(stub, request(model="a", **SHORT))
        assert queued.accepted.wait(10) and queued.error is None
        unload, out = in_thread(lambda: stub.UnloadModel(pb.UnloadModelRequest(name="a"), timeout=60))
        queued.join(20)
        slow_backend.EXECUTE.set()
        unload.join(30)
        assert "error" not in out, out
        assert running.join().code() == grpc.StatusCode.UNAVAILABLE
        assert queued.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(queued.error.trailing_metadata() or ()).get("x-videogen-not-started") == "1"
        assert "before the request started" in queued.error.details(), queued.error.details()
        assert "x-videogen-not-started" not in dict(running.error.trailing_metadata() or ())
        assert server.metric("videogen_requests_total", model="a", outcome="rejected", code="UNAVAILABLE") == 1
        assert server.metric("videogen_requests_total", model="a", outcome="error", code="UNAVAILABLE") == 1


def test_a_caller_gone_during_preprocessing_keeps_its_slot_until_the_work_ends(tmp_path, slow_backend):
    """A caller that cancels while its image is being preprocessed cannot stop the thread doing it: that
    work still counts toward admission until it ends (it used to free its slot at once, so a burst of
    cancelled calls let more preprocessing start than the bound), and an unload waits for it before
    finalizing the backend it runs on."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        slow_backend.GATE.clear()
        gone = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        wait_until(lambda: preparing(server) == 1)
        gone.call.cancel()
        assert gone.join().code() == grpc.StatusCode.CANCELLED
        time.sleep(0.3)  # the server has seen the cancellation; its preprocessing thread still waits
        assert preparing(server) == 1
        rt = server.engine.models["a"].loaded[1]
        assert not rt.idle.is_set(), "an unload now would finalize the backend under the running prepare"
        slow_backend.GATE.set()
        wait_until(lambda: preparing(server) == 0 and rt.idle.is_set())
        assert 'videogen_model_ready{model="a",version="1"} 1.0' in server.scrape()
        stub.UnloadModel(pb.UnloadModelRequest(name="a"))
        assert server.metric("videogen_requests_total", code="INTERNAL") == 0
        text = server.scrape()
        assert "videogen_model_ready{" not in text  # unloaded: no 0 left for the alert to page on
        assert "videogen_queue_capacity{" not in text  # (nor a capacity for a queue depth gone)
        assert "videogen_instances_stuck{" not in text  # (none stuck: nothing to keep it for)


def test_loads_in_flight_are_joined_and_stop_with_the_server(tmp_path, slow_backend):
    """LoadModel calls that give up at their deadline while a reload runs join that reload instead of
    queueing one reload (a recompile) each; a server stopped during a reload leaves no instance behind.
    The three calls (0.2 s each) must all come while the reload's 4 s initialize runs: with 1 s, a ~2 s
    pause of this process's garbage collector (tests/gc_pauses.py) could outlast it and start a second."""
    import threading

    server = ServerThread(slow_repo(tmp_path, init_seconds=4.0), model_control_mode="explicit", load_models=("a",))
    with server:
        stub = server.stub()
        assert slow_backend.LOADS == [1]
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: not server.engine._control_tasks)
        assert slow_backend.LOADS == [1, 1], "one reload, joined by the later calls"
        assert stub.GetModel(pb.GetModelRequest(name="a")).state == pb.MODEL_STATE_READY
        with pytest.raises(grpc.RpcError):
            stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=0.2)  # a reload in flight at the stop
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("instance-a-")], timeout=15)


def test_load_unload_load_ends_loaded_and_a_drain_loads_nothing(tmp_path, slow_backend):
    """Load, Unload, Load, each sent while the one before runs: the second Load joined the first (queued
    before the Unload) and every call said OK with the model left unloaded. And a LoadModel during a
    drain loaded (and, on a GPU, compiled) a model while every health name said NOT_SERVING; the
    poller stops for a drain for that reason, and so do the calls now (black-box review)."""
    server = ServerThread(slow_repo(tmp_path, init_seconds=1.0), model_control_mode="explicit")
    with server:
        stub = server.stub()
        first, first_out = in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=60))
        wait_until(lambda: server.engine._control_tasks)
        unload, unload_out = in_thread(lambda: stub.UnloadModel(pb.UnloadModelRequest(name="a"), timeout=60))
        time.sleep(0.2)  # the unload waits for the load
        second, second_out = in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=60))
        for t in (first, unload, second):
            t.join(60)
        assert not [out["error"] for out in (first_out, unload_out, second_out) if "error" in out]
        assert second_out["value"].state == pb.MODEL_STATE_READY
        assert stub.GetModel(pb.GetModelRequest(name="a")).state == pb.MODEL_STATE_READY
        assert slow_backend.LOADS == [1, 1]  # the second load ran after the unload, not joined to the first

        server.engine.begin_drain()
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert server.run(server.engine.load_model("a", raise_errors=False)) is None  # start-up's loads: quiet
        assert slow_backend.LOADS == [1, 1]


def test_two_loads_of_a_model_new_to_the_repository_load_it_once(tmp_path, slow_backend):
    """The second LoadModel of a model added after start-up joins the first: it loaded it twice, the
    first copy left holding its instances (and device memory) outside the model (review of the change)."""
    repo = slow_repo(tmp_path, init_seconds=3.0)  # the second call comes within it, pauses included
    with ServerThread(repo, model_control_mode="explicit") as server:
        shutil.copytree(repo / "a", repo / "b")
        (repo / "b" / "config.pbtxt").write_text((repo / "a" / "config.pbtxt").read_text().replace('"a"', '"b"'))
        stub = server.stub()
        calls = [in_thread(lambda: stub.LoadModel(pb.LoadModelRequest(name="b"), timeout=60)) for _ in range(2)]
        for thread, out in calls:
            thread.join(60)
            assert "error" not in out, out
        assert slow_backend.LOADS == [1]
        assert [rt for rt in server.engine._runtimes if rt.name == "b"] == list(server.engine.models["b"].loaded.values())
        # two loads in one turn of the engine's loop (before either made the model's entry): loaded once too
        shutil.copytree(repo / "a", repo / "c")
        (repo / "c" / "config.pbtxt").write_text((repo / "a" / "config.pbtxt").read_text().replace('"a"', '"c"'))

        async def both():
            await asyncio.gather(server.engine.load_model("c"), server.engine.load_model("c"))

        server.run(both())
        assert slow_backend.LOADS == [1, 1]


def test_a_load_of_a_model_whose_folder_moved_or_went_reads_the_repositories_again(tmp_path, slow_backend):
    """Explicit mode scans the repositories at start only: a LoadModel of a model whose folder had since
    gone failed INTERNAL (a fingerprint of the missing folder), and one moved to the second repository
    was never found there (repository review). Gone: NOT_FOUND, the version loaded before still serving;
    moved: loaded from where it is."""
    repo = slow_repo(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    with ServerThread(repo, second, model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        shutil.move(repo / "a", tmp_path / "a-away")
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "is gone" in err.value.details()
        assert collect(stub, request(model="a", **SHORT))[-1].HasField("summary")  # still loaded
        shutil.move(tmp_path / "a-away", second / "a")
        assert stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=30).state == pb.MODEL_STATE_READY
        assert server.engine.models["a"].path == second / "a"
        assert slow_backend.LOADS == [1, 1]


def test_a_load_whose_caller_gives_up_still_completes(tmp_path, slow_backend):
    """LoadModel with a deadline shorter than the load: the caller gets DEADLINE_EXCEEDED, the load goes
    on and the model serves (a load cut short used to stay LOADING for good, its instance holding the
    device)."""
    with ServerThread(slow_repo(tmp_path, init_seconds=1.5), model_control_mode="explicit") as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(name="a"), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: stub.GetModel(pb.GetModelRequest(name="a")).state == pb.MODEL_STATE_READY)
        assert collect(stub, request(model="a", num_frames=1, num_inference_steps=1))[-1].summary.num_frames == 1
        assert server.engine.ready


def test_a_full_queue_refuses_before_any_image_work(tmp_path, slow_backend):
    """Requests in preprocessing count toward what the model can take: with max_queue_size 1 and one
    instance (one running, one queued, as Triton takes them), a third request while two are still
    preprocessing is refused at once, before its image is decoded."""
    extra = "dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
    with ServerThread(slow_repo(tmp_path, extra)) as server:
        stub = server.stub()
        slow_backend.GATE.clear()
        first = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        second = Stream(stub, request(model="a", num_frames=1, num_inference_steps=1))
        wait_until(lambda: preparing(server) == 2)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="a", num_frames=1, num_inference_steps=1))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 5, "refused without waiting for the preprocessing threads"
        slow_backend.GATE.set()
        # released together, the second may reach the queue before the instance took the first
        codes = [first.join().code(), second.join().code()]
        assert None in codes and set(codes) <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert preparing(server) == 0 and server.engine.models["a"].loaded[1].idle.is_set()


def test_a_device_error_during_conditioning_retires_the_instance(make_repo, monkeypatch):
    """A CUDA error that leaves the device unusable, met while encoding a request's image, ends the
    instance (UNAVAILABLE; health NOT_SERVING so the orchestrator restarts the pod) instead of failing
    every later request one by one. A workspace allocation failure is memory pressure: that request
    gets RESOURCE_EXHAUSTED and the instance serves on. There is no GPU here: the errors are raised
    with CUDA's own texts from the VAE encode the conditioning runs."""
    from videogen_server.backends.svd.backend import SVDBackend

    real = SVDBackend._encode_vae
    fault = {"text": ""}

    def encode(self, image):
        if fault["text"]:
            raise RuntimeError(fault["text"])
        return real(self, image)

    monkeypatch.setattr(SVDBackend, "_encode_vae", encode)
    with ServerThread(make_repo({"m": tiny_config("m")})) as server:
        stub = server.stub()
        fault["text"] = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", **SHORT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        fault["text"] = ""
        assert collect(stub, request(model="m", **SHORT))[-1].summary.num_frames == 1
        fault["text"] = "CUDA error: an illegal memory access was encountered"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # the version is down before the caller hears of it (a retry at once must not find it READY)
        assert stub.GetModel(pb.GetModelRequest(name="m")).state == pb.MODEL_STATE_FAILED
        assert not server.engine.ready
        # nothing here would run a request: load-balancing clients' health (the API's service name) says
        # so too, not only the orchestrator's (""), so that they stop sending calls here
        health = health_pb2_grpc.HealthStub(server.channel())
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen")).status \
                != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "the service name still reads SERVING"
            time.sleep(0.05)


def test_an_instance_thread_that_dies_takes_its_requests_and_the_version_down(tmp_path, slow_backend):
    """Something outside a batch's work failing on the instance thread (a bug; here a backend raising
    SystemExit, which no `except Exception` sees) ended the thread silently: its batch's callers waited
    forever, and the instance still counted as ready, so the version took requests no thread would run.
    Now the batch's caller hears UNAVAILABLE, the one queued behind it is ended not started (the SDK
    sends it elsewhere), and the version is down."""
    with ServerThread(slow_repo(tmp_path), model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        slow_backend.EXECUTE.clear()
        doomed = Stream(stub, request(model="a", seed=99, **SHORT))  # the backend raises SystemExit for it
        assert doomed.progressed.wait(10)
        queued = Stream(stub, request(model="a", **SHORT))
        assert queued.accepted.wait(10)
        slow_backend.EXECUTE.set()
        assert doomed.join().code() == grpc.StatusCode.UNAVAILABLE
        assert queued.join().code() == grpc.StatusCode.UNAVAILABLE
        assert ("x-videogen-not-started", "1") in (queued.error.trailing_metadata() or ())
        assert stub.GetModel(pb.GetModelRequest(name="a")).state == pb.MODEL_STATE_FAILED
        assert server.metric("videogen_instances_busy", model="a", version="1") == 0


def test_a_model_with_a_malformed_file_fails_alone(make_repo, caplog):
    """An unexpected error reading one model (here its UNet config) fails that model, named in GetModel's
    reason, while the server starts and serves the others; the instance's clean-up after the failed load
    does not fail too (an AttributeError in finalize buried the load's own error in the log)."""
    from ..helpers import TINY_PARAMETERS

    repo = make_repo({"good": tiny_config("good"), "bad": tiny_config("bad"),  # no such weights variant: fails
                      "early": tiny_config("early", parameters=TINY_PARAMETERS  # in from_pretrained, first
                                           + 'parameters { key: "variant" value { string_value: "fp7" } }')})
    unet_config = repo / "bad" / "1" / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    config["num_frames"] = None
    unet_config.write_text(json.dumps(config))
    with ServerThread(repo) as server:
        stub = server.stub()
        bad = stub.GetModel(pb.GetModelRequest(name="bad"))
        assert bad.state == pb.MODEL_STATE_FAILED and "TypeError" in bad.reason
        assert stub.GetModel(pb.GetModelRequest(name="early")).state == pb.MODEL_STATE_FAILED
        assert collect(stub, request(model="good", **SHORT))[-1].summary.num_frames == 1
    assert "finalize of instance" not in caplog.text, caplog.text


def test_exit_on_error_stops_a_server_whose_model_failed_to_load(make_repo, tmp_path):
    """Without it a model that cannot load leaves a pod up and NOT_SERVING until its startup probe gives
    up (30 minutes in deploy/k8s), then the same again (deploy review); with it the server stops at once
    naming the model and why, and the orchestrator shows a crash loop. The manifests turn it on."""
    import subprocess
    import sys

    from videogen_server.errors import NotReady

    repo = make_repo({"good": tiny_config("good"), "bad": tiny_config("bad", parameters='parameters { key: "x" }')})
    server = ServerThread(repo, exit_on_error=True)
    with pytest.raises(NotReady, match=r"exit on error: bad version 1 \(.*\)|exit on error: bad \(.*config\.pbtxt"):
        server.start()
    server.stop()
    with ServerThread(repo) as tolerant:  # the default: the others serve
        assert collect(tolerant.stub(), request(model="good", **SHORT))[-1].summary.num_frames == 1
    proc = subprocess.run([sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo),
                           "--port", "0", "--metrics-port", "-1", "--exit-on-error"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "exit on error: bad" in proc.stderr, proc.stderr[-2000:]
    # an empty (or unmounted) repository serves nothing, ever, with every model loaded at start: it left a
    # pod up and never ready, no crash loop (deploy review); in explicit and poll modes models come later
    empty = tmp_path / "empty"
    empty.mkdir()
    server = ServerThread(empty, exit_on_error=True)
    with pytest.raises(NotReady, match=r"exit on error: no model in the model repositories \(.*empty\)"):
        server.start()
    server.stop()
    for mode in ("explicit", "poll"):
        with ServerThread(empty, exit_on_error=True, model_control_mode=mode) as waiting:
            assert waiting.stub().ListModels(pb.ListModelsRequest()).models == []


@pytest.mark.timeout(300)
def test_sigterm_during_start_up_stops_cleanly(make_repo, tmp_path):
    """A pod deleted while its model still compiles (a scale-down deletes unready pods first; an aborted
    rollout) got a CancelledError traceback, then SIGABRT ('terminate called without an active
    exception') as the interpreter finalized around the instance thread inside torch: exit 134 (deploy
    review). Now: exit 0 at once, the load left to die with the process."""
    import signal
    import subprocess
    import sys

    from ..helpers import TINY_PARAMETERS

    compiled = TINY_PARAMETERS + 'parameters { key: "compile" value { string_value: "default" } }\n' \
        + f'parameters {{ key: "compile_cache_dir" value {{ string_value: "{tmp_path / "cache"}" }} }}\n'
    repo = make_repo({"m": tiny_config("m", 'model_warmup [ { name: "w" inputs { key: "num_inference_steps" '
                                            'value: "1" } } ]', parameters=compiled)})
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository",
                                 str(repo), "--port", "0", "--metrics-port", "-1"], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "loaded in" not in log.read_text():  # the instance is up; its warm-up compiles next
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(1.0)
            assert "ready:" not in log.read_text(), "the warm-up finished before the signal: no start-up to stop"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "stopped during start-up" in text and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("strict", [True, False])
def test_readiness_is_strict_or_follows_the_server_taking_calls(tmp_path, slow_backend, strict):
    """Readiness ("" and KServe's ServerReady, what the k8s readiness probe reads), as Triton's
    --strict-readiness. Strict (the default): a model loading or failed after start-up makes the server
    unready, and gRPC health said so only at the load's end while ServerReady said it at once (the two
    disagreed; lifecycle audit). Not strict: the server stays ready with a model ready, so a model copied
    in broken (poll mode) or a LoadModel no longer takes every pod out of its Service. The API names
    (what the k8s liveness probe reads) stay SERVING either way."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    repo = slow_repo(tmp_path)
    config = (repo / "a" / "config.pbtxt").read_text()
    for name, text in (("b", config.replace('"0.0"', '"3.0"')), ("c", config.replace('"0.0"', '"x"'))):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text.replace('name: "a"', f'name: "{name}"'))
    with ServerThread(repo, model_control_mode="explicit", load_models=("a",), strict_readiness=strict) as server:
        health = health_pb2_grpc.HealthStub(server.channel())
        kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        serving = health_pb2.HealthCheckResponse.SERVING

        def health_ready() -> bool:
            assert health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen"), timeout=5).status == serving
            return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving

        def ready(expected: bool) -> bool:
            """Health reaches `expected` (a task of the event loop updates it: within 2 s; a load that
            never told it, 3 s long, would not), and KServe's ServerReady (read at once) agrees."""
            wait_until(lambda: health_ready() is expected, timeout=2)
            return kserve.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready is expected

        assert ready(True)
        loading, out = in_thread(lambda: server.stub().LoadModel(pb.LoadModelRequest(name="b"), timeout=60))
        wait_until(lambda: any(rt.state == "LOADING" for rt in server.engine.models["b"].loaded.values()))
        assert ready(not strict)  # b initializes for 3 s
        loading.join(60)
        assert out["value"].state == pb.MODEL_STATE_READY and ready(True)
        with pytest.raises(grpc.RpcError) as failed:
            server.stub().LoadModel(pb.LoadModelRequest(name="c"), timeout=60)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failed.value.details()
        assert ready(not strict)
        assert collect(server.stub(), request(model="a", width=16, height=16, **SHORT))[-1].summary.num_frames == 1


def test_out_of_memory_in_a_backend_that_does_not_handle_it_is_resource_exhausted(tmp_path, slow_backend):
    """SVD's backend turns its out-of-memory errors into RESOURCE_EXHAUSTED itself; a third-party
    backend's reached the caller as INTERNAL "internal error", counted so, and the out-of-memory alert
    (code RESOURCE_EXHAUSTED) stayed silent (lifecycle audit)."""
    from ..helpers import details_of

    with ServerThread(slow_repo(tmp_path)) as server:
        with pytest.raises(grpc.RpcError) as err:
            collect(server.stub(), request(model="a", width=16, height=16, seed=98, **SHORT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert details_of(err.value)["ErrorInfo"].reason == "OUT_OF_MEMORY"
        assert server.metric("videogen_requests_total", model="a", outcome="error", code="RESOURCE_EXHAUSTED") == 1
        assert collect(server.stub(), request(model="a", width=16, height=16, **SHORT))[-1].summary.num_frames == 1


def test_a_second_signal_ends_the_drain_a_third_exits_and_a_stuck_instance_does_not_hold_the_stop(
        tmp_path, slow_backend, monkeypatch, caplog):
    """A second SIGTERM/SIGINT did nothing (it logged "draining" again), and the stop waited without end
    for an instance whose backend call does not return: on bare metal the process never exited, and
    Ctrl+C did not help (lifecycle audit). Now the second ends the drain's grace, the third exits at once
    (the exit itself, two lines, stands in here: it would end pytest), and the stop leaves a stuck
    instance to the process's exit after STOP_JOIN_SECONDS (10, 1 here), naming it."""
    import signal

    from videogen_server import app
    from videogen_server.engine import engine

    exits = []
    monkeypatch.setattr(app, "_exit_now", exits.append)
    monkeypatch.setattr(engine, "STOP_JOIN_SECONDS", 1.0)
    server = ServerThread(slow_repo(tmp_path), drain_grace_seconds=60)
    with server, caplog.at_level("INFO"):
        slow_backend.EXECUTE.clear()  # the backend's call does not return (until the test's end)
        running = Stream(server.stub(), request(model="a", width=16, height=16, **SHORT))
        assert running.progressed.wait(10)
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)
        time.sleep(0.5)
        assert running.error is None and "summary" not in [r.WhichOneof("event") for r in running.responses]
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGINT)
        assert running.join(10).code() == grpc.StatusCode.UNAVAILABLE, running.error
        assert "when its drain was cut short" in running.error.details()
        assert "drain cut short by a second signal" in caplog.text
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)
        wait_until(lambda: exits, timeout=5)
        assert exits == [128 + signal.SIGTERM]
        server.run(server.server.wait(), timeout=20)  # the stop ends without the stuck instance
        assert "instance 0 of a/1 still busy 1s after its requests ended" in caplog.text
        assert "stopped" in [r.getMessage() for r in caplog.records]
        slow_backend.EXECUTE.set()  # the stuck call returns: its thread ends before the test's loop closes
        wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("instance-a-")], timeout=10)
