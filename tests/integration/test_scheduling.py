"""The Triton-style core through the gRPC API: queue, priorities, timeouts, cancellation,
instances, dynamic batching, model control, version policy, custom backends."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import (LONG_REQUEST as LONG, SHORT_REQUEST as SHORT, ServerThread, Stream, collect, details_of, full_queue,
                       install_backend, raw_frames, request, tiny_config, wait_until)


def one_level_queue(size: int, extra: str = "") -> str:
    return f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {size} {extra} }} }}"


def test_queue_full_is_resource_exhausted(make_repo):
    with full_queue(make_repo({"m": tiny_config("m", one_level_queue(1))})) as server:
        with pytest.raises(grpc.RpcError) as err:
            collect(server.stub(), request(model="m", **SHORT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.metric("videogen_requests_total", model="m", code="RESOURCE_EXHAUSTED", outcome="rejected") == 1


def test_high_priority_runs_before_earlier_low_priority(make_repo):
    cfg = tiny_config("m", "dynamic_batching { priority_levels: 2 default_priority_level: 2 }")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        running = Stream(stub, request(model="m", **LONG))
        running.progressed.wait(10)
        low = [Stream(stub, request(model="m", **SHORT)) for _ in range(2)]
        for s in low:
            s.accepted.wait(10)
        high = Stream(stub, request(model="m", priority=1, **SHORT))
        high.accepted.wait(10)
        assert high.responses[0].accepted.queue_position == 0  # nothing of its level ahead
        for s in [running, high, *low]:
            s.join()
        assert high.done_at < min(s.done_at for s in low)


def test_queue_timeout_and_deadline_while_queued(make_repo):
    # allow_timeout_override as in Triton: requests may shorten the timeout, never lengthen it
    cfg = tiny_config("m", one_level_queue(8, "default_timeout_microseconds: 300000 allow_timeout_override: true"))
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        running = Stream(stub, request(model="m", **LONG))
        running.progressed.wait(10)
        batches = server.metric("videogen_batch_size_count", model="m")
        waits = server.metric("videogen_queue_wait_seconds_count", model="m")
        waited = server.metric("videogen_queue_wait_seconds_sum", model="m")
        by_config = Stream(stub, request(model="m", **SHORT)).join()
        by_request = Stream(stub, request(model="m", timeout_microseconds=100_000, **SHORT)).join()
        by_deadline = Stream(stub, request(model="m", **SHORT), timeout=0.2).join()
        assert by_config.code() == by_request.code() == by_deadline.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert running._thread.is_alive()  # each gave up while the long request was still running
        running.join()
        # none of them ever reached an instance, and their waits count (0.3 + 0.1 + 0.2 s): a queue-wait
        # alert saw none of the requests whose callers gave up waiting
        assert server.metric("videogen_batch_size_count", model="m") == batches
        wait_until(lambda: server.metric("videogen_queue_wait_seconds_count", model="m") == waits + 3)
        # (the deadline's 0.2 s runs from the call, so the server sees a little less of it)
        assert server.metric("videogen_queue_wait_seconds_sum", model="m") - waited >= 0.45
        # a request may not lengthen the model's timeout (allow_timeout_override or not)
        longer = Stream(stub, request(model="m", **LONG))
        longer.progressed.wait(10)
        asked_more = Stream(stub, request(model="m", timeout_microseconds=60_000_000, **SHORT)).join()
        assert asked_more.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        longer.join()


def test_a_deadline_that_passes_while_running_counts_as_deadline_exceeded(make_repo, caplog):
    """gRPC cancels the call whose deadline passes; the caller reads DEADLINE_EXCEEDED, and the
    request metrics and log say the same (they said CANCELLED, a caller's own choice), the log with
    why (it said "internal error": client review)."""
    caplog.set_level("INFO", logger="videogen.requests")
    with ServerThread(make_repo({"m": None})) as server:
        stub = server.stub()
        late = Stream(stub, request(model="m", num_inference_steps=50, num_frames=4), timeout=1.5)  # ~6 s
        assert late.progressed.wait(10)
        assert late.join().code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.error
        wait_until(lambda: server.metric("videogen_requests_total", model="m", outcome="error",
                                         code="DEADLINE_EXCEEDED") == 1)
        assert server.metric("videogen_requests_total", model="m", code="CANCELLED") == 0
    [record] = [r.videogen_request for r in caplog.records if hasattr(r, "videogen_request")
                and r.videogen_request["code"] == "DEADLINE_EXCEEDED"]
    assert record["error"] == "the caller's deadline passed", record


def test_cancel_queued_and_running_requests_frees_them(make_repo):
    with ServerThread(make_repo({"m": tiny_config("m", one_level_queue(4))})) as server:
        stub = server.stub()
        running = Stream(stub, request(model="m", num_inference_steps=50, num_frames=4))
        running.progressed.wait(10)
        queued = Stream(stub, request(model="m", **SHORT))
        queued.accepted.wait(10)
        queued.call.cancel()
        wait_until(lambda: server.metric("videogen_queue_depth", model="m") == 0)
        steps_before = server.metric("videogen_denoise_step_seconds_count", model="m")
        running.call.cancel()
        t0 = time.monotonic()
        after = collect(stub, request(model="m", **SHORT))
        assert after[-1].summary.num_frames == 1
        # the cancelled run stopped within a step or two, far from its 50
        wait_until(lambda: server.metric("videogen_requests_total", model="m", outcome="cancelled") == 2)
        assert server.metric("videogen_denoise_step_seconds_count", model="m") - steps_before <= 3
        assert time.monotonic() - t0 < 5
        assert server.metric("videogen_inflight_requests", model="m") == 0
        assert server.metric("videogen_instances_busy", model="m") == 0


def test_two_instances_serve_two_requests_at_once(make_repo):
    cfg = tiny_config("m", "instance_group [ { count: 2, kind: KIND_CPU } ]")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        assert stub.GetModel(pb.GetModelRequest(name="m")).instances == 2
        # runs of ~5 s: one that waited for the other's would show it, and a ~2 s pause of this process's
        # garbage collector (tests/gc_pauses.py) between enqueue and start would not
        streams = [Stream(stub, request(model="m", **dict(LONG, num_inference_steps=40))) for _ in range(2)]
        for s in streams:
            s.join()
        # neither waited for the other: both were taken at once
        assert all(s.summary.queue_seconds < 2.5 for s in streams)
        starts = [s.times[1] for s in streams]  # first progress
        ends = [s.done_at for s in streams]
        assert max(starts) < min(ends)  # their runs overlapped


def test_dynamic_batching_parity(make_repo):
    """Two requests of one shape run as one batch; each gets the frames it gets alone.

    Each request keeps its own generator, conditioning, guidance and decode chunking, so the only
    difference a batch makes is float rounding inside batched GEMM/convolution kernels (CPU and GPU
    kernels are not batch-invariant). After 8-bit quantisation that moves at most a handful of
    values by one level; anything else (a mixed-up seed, conditioning or chunking) changes nearly
    every pixel.
    """
    # a 10 s delay costs nothing (the second request ends the wait: preferred_batch_size) and keeps the pair
    # one batch across a ~2 s pause of this process's garbage collector between them (tests/gc_pauses.py)
    cfg = tiny_config("m", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 10000000 "
                           "preferred_batch_size: [2] }")
    raw = {"frame_encoding": pb.FRAME_ENCODING_RAW_RGB, "stream_video": False}
    a = dict(seed=1, motion_bucket_id=20, fps=5, noise_aug_strength=0.05, decode_chunk_size=1)
    b = dict(seed=2, motion_bucket_id=200, fps=9, min_guidance_scale=1.5, decode_chunk_size=3)
    common = dict(model="m", num_frames=3, num_inference_steps=3, output=raw)
    alone_cfg = tiny_config("alone")
    with ServerThread(make_repo({"m": cfg, "alone": alone_cfg})) as server:
        stub = server.stub()
        streams = [Stream(stub, request(**common, **p)) for p in (a, b)]
        for s in streams:
            s.join()
        assert [s.summary.batch_size for s in streams] == [2, 2]
        for s, p in zip(streams, (a, b)):
            alone = collect(stub, request(**{**common, "model": "alone"}, **p))
            assert alone[-1].summary.batch_size == 1
            batched, single = raw_frames(s.responses).astype(int), raw_frames(alone).astype(int)
            assert batched.shape == single.shape
            diff = np.abs(batched - single)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        assert server.metric("videogen_batch_size_sum", model="m") == 2


def test_batches_of_the_pipeline_are_timed(make_repo):
    """Batches of two on the real pipeline become run-time samples (the scheduler's estimates): the
    first request of a batch ends for its caller while the backend still decodes the second, and that
    order must not make the batch look cancelled (it did: no batch of two was ever a sample)."""
    cfg = tiny_config("m", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 10000000 "
                           "preferred_batch_size: [2] }")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        for _ in range(3):
            streams = [Stream(stub, request(model="m", seed=seed, **SHORT)) for seed in (1, 2)]
            assert [s.join().summary.batch_size for s in streams] == [2, 2]
        scheduler = server.engine.models["m"].loaded[1].scheduler
        key = streams[0].responses[0].accepted.parameters

        def estimate():
            with scheduler._cv:  # run_times is the scheduler's, under its lock
                return scheduler.run_times.batch((key.width, key.height, 1, 1, False), 2)

        # a batch is a sample once its callers have their answers and its instance thread has returned
        # from execute: the last stream can end first (a race a loaded machine lost 1 run in 8)
        wait_until(lambda: estimate() is not None, timeout=10, what="the third batch's sample")
        found = estimate()
        assert 0 < found.busy_s <= found.end_s < 30, found


def test_different_shapes_are_not_batched(make_repo):
    cfg = tiny_config("m", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 300000 }")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        streams = [Stream(stub, request(model="m", num_frames=n, **{k: v for k, v in SHORT.items() if k != "num_frames"}))
                   for n in (1, 2)]
        assert [s.join().summary.batch_size for s in streams] == [1, 1]


def test_explicit_load_unload_while_another_model_serves(make_repo):
    repo = make_repo({"a": tiny_config("a"), "b": tiny_config("b")})
    with ServerThread(repo, model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="b", **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        running = Stream(stub, request(model="a", **LONG))
        running.progressed.wait(10)
        info = stub.LoadModel(pb.LoadModelRequest(name="b"))
        assert info.state == pb.MODEL_STATE_READY
        assert collect(stub, request(model="b", **SHORT))[-1].summary.num_frames == 1
        # unloading a waits for its in-flight request, which completes
        stub.UnloadModel(pb.UnloadModelRequest(name="a"))
        assert running.join().summary.num_frames == 4
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="a", **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stub.GetModel(pb.GetModelRequest(name="a")).state == pb.MODEL_STATE_UNAVAILABLE
        assert collect(stub, request(model="b", **SHORT))[-1].summary.num_frames == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_unload_refused_without_explicit_mode(tiny_server):
    with pytest.raises(grpc.RpcError) as err:
        tiny_server.stub().UnloadModel(pb.UnloadModelRequest(name="svd-tiny"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_failed_reload_keeps_the_previous_version_serving(make_repo):
    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="explicit", load_models=("a",)) as server:
        stub = server.stub()
        (repo / "a" / "config.pbtxt").write_text(tiny_config("a", parameters='parameters { key: "dtype" value { string_value: "float8" } }'))
        with pytest.raises(grpc.RpcError) as err:
            stub.LoadModel(pb.LoadModelRequest(name="a"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "config.pbtxt" in err.value.details() and "dtype" in err.value.details()
        assert collect(stub, request(model="a", **SHORT))[-1].summary.num_frames == 1


@pytest.mark.parametrize("policy,loaded", [
    ("", [3]),
    ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
    ("version_policy: { all: {} }", [1, 2, 3]),
    ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
])
def test_version_policy(make_repo, policy, loaded):
    repo = make_repo({"m": tiny_config("m", policy)}, versions={"m": [1, 2, 3]})
    with ServerThread(repo) as server:
        stub = server.stub()
        info = stub.GetModel(pb.GetModelRequest(name="m"))
        assert [v.version for v in info.versions] == loaded
        assert all(v.state == pb.MODEL_STATE_READY for v in info.versions)
        # unset version = the highest; an explicit one runs that version; others are NOT_FOUND
        assert collect(stub, request(model="m", **SHORT))[0].accepted.model_version == max(loaded)
        assert collect(stub, request(model="m", model_version=min(loaded), **SHORT))[0].accepted.model_version == min(loaded)
        if 2 not in loaded:
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, request(model="m", model_version=2, **SHORT))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_bad_config_fails_that_model_only(make_repo):
    repo = make_repo({"good": tiny_config("good"), "bad": tiny_config("bad", "max_batch_size: -1")})
    with ServerThread(repo) as server:
        stub = server.stub()
        bad = stub.GetModel(pb.GetModelRequest(name="bad"))
        assert bad.state == pb.MODEL_STATE_FAILED
        assert "bad/config.pbtxt: max_batch_size: must be >= 0" in bad.reason  # for operators
        assert not stub.GetModel(pb.GetModelRequest(name="good")).reason
        assert collect(stub, request(model="good", **SHORT))[-1].summary.num_frames == 1
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="bad", **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # an inference caller learns that it failed, not the server's paths
        assert err.value.details() == "model 'bad' is not ready (it failed to load)"
        # told apart from a model still loading by its reason: it stays so until a load succeeds (API audit)
        assert details_of(err.value)["ErrorInfo"].reason == "MODEL_LOAD_FAILED"
        # GetModel without a name: the field named, not a model called "" not found (API audit)
        with pytest.raises(grpc.RpcError) as unnamed:
            stub.GetModel(pb.GetModelRequest())
        assert (unnamed.value.code(), unnamed.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "name: required")


ECHO_BACKEND = '''
import numpy as np
from videogen_server.backends import Backend, Finished, FramesDecoded, StepDone


class EchoBackend(Backend):
    """Frames whose every pixel is the frame index; proves third-party backends plug in by name."""

    name = "echo"

    def initialize(self, context):
        self.context = context

    def execute(self, requests):
        for r in requests:
            p = r.params
            for step in range(1, p.num_inference_steps + 1):
                r.sender.send(StepDone(step, p.num_inference_steps))
            frames = np.stack([np.full((p.height, p.width, 3), i, np.uint8) for i in range(p.num_frames)])
            r.sender.send(FramesDecoded(chunk_index=0, start_index=0, frames=frames))
            r.sender.send(Finished())
'''


def test_custom_backend_from_an_entry_point(tmp_path, monkeypatch):
    install_backend(tmp_path, monkeypatch, "echo_backend_pkg", "echo", ECHO_BACKEND)
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(
        'name: "echo"\nbackend: "echo"\ninstance_group [ { kind: KIND_CPU } ]\n'
        'parameters { key: "default_width" value { string_value: "32" } }\n'
        'parameters { key: "default_height" value { string_value: "16" } }\n'
        'parameters { key: "default_num_frames" value { string_value: "3" } }\n'
        'parameters { key: "min_width" value { string_value: "16" } }\n'
        'parameters { key: "min_height" value { string_value: "16" } }')
    with ServerThread(repo) as server:
        responses = collect(server.stub(), request(model="echo", output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}))
        frames = raw_frames(responses)
        assert frames.shape == (3, 16, 32, 3)
        assert [int(f.max()) for f in frames] == [0, 1, 2]
        assert responses[-1].summary.num_frames == 3


def test_an_idle_instance_takes_work_while_another_gathers_a_batch(make_repo):
    """Instance A holds a request of one shape for max_queue_delay; a request of another shape
    arriving meanwhile goes to idle instance B at once (and waits its own batching delay there),
    not after A's batch has run (which would be about twice the delay plus a run). A 4 s delay, and a
    bound 3 s above it, leave room for a pause of this process's garbage collector (tests/gc_pauses.py)."""
    cfg = tiny_config("m", "max_batch_size: 2\ninstance_group [ { count: 2, kind: KIND_CPU } ]\n"
                           "dynamic_batching { max_queue_delay_microseconds: 4000000 }")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        gathering = Stream(stub, request(model="m", num_frames=1, **{k: v for k, v in SHORT.items() if k != "num_frames"}))
        gathering.accepted.wait(10)
        time.sleep(0.2)  # A is now waiting for a partner of its shape
        other = Stream(stub, request(model="m", num_frames=2, **{k: v for k, v in SHORT.items() if k != "num_frames"}))
        waited = other.join().summary.queue_seconds
        assert 3.9 <= waited < 7.0  # its own 4 s batching delay, on the other instance (after A's: ~7.8 s)
        assert gathering.join().summary.queue_seconds >= 3.9  # A did wait for a partner


def test_reloading_a_loaded_model_keeps_it_ready(make_repo):
    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="explicit", load_models=("a",)) as server:
        assert server.metric("videogen_model_ready", model="a", version="1") == 1
        server.stub().LoadModel(pb.LoadModelRequest(name="a"))
        assert server.metric("videogen_model_ready", model="a", version="1") == 1
        assert collect(server.stub(), request(model="a", **SHORT))[-1].summary.num_frames == 1
