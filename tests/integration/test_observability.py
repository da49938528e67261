"""Metrics over real HTTP scrapes, gRPC health, reflection, request logs and request ids."""
from __future__ import annotations

import json
import logging
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..helpers import (ServerThread, Stream, collect, ipv6_loopback, metric_value, port_answers, request, tiny_config,
                       wait_until)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_REQUESTS, _M = "videogen_requests_total", {"model": "m", "version": "1"}


def health(server: ServerThread, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(service=service)).status


def health_list(server: ServerThread) -> dict[str, int]:
    listed = health_pb2_grpc.HealthStub(server.channel()).List(health_pb2.HealthListRequest(), timeout=10)
    return {name: answer.status for name, answer in listed.statuses.items()}


HISTOGRAMS = {  # metric -> observations one request of 3 steps, 4 frames, decode chunks of 2 adds
    "videogen_request_duration_seconds": 1, "videogen_queue_wait_seconds": 1,
    "videogen_time_to_first_frame_seconds": 1, "videogen_image_encode_seconds": 1,
    "videogen_denoise_step_seconds": 3, "videogen_vae_decode_chunk_seconds": 2, "videogen_video_encode_seconds": 1,
    "videogen_batch_size": 1, "videogen_preprocess_seconds": 1,
}


def test_metrics_move_by_exactly_one_request(make_repo):
    with ServerThread(make_repo({"m": tiny_config("m")})) as server:
        labels = {"model": "m", "version": "1"}
        before = server.scrape()
        collect(server.stub(), request(model="m", num_frames=4, num_inference_steps=3, decode_chunk_size=2))
        # the generator's cleanup records after the last message, the request's count last; the instance
        # thread frees itself apart from it
        wait_until(lambda: server.metric("videogen_requests_total", model="m", outcome="success", code="OK") == 1
                   and server.metric("videogen_instances_busy", model="m") == 0)
        after = server.scrape()

        def delta(name, **extra):
            return metric_value(after, name, **labels, **extra) - metric_value(before, name, **labels, **extra)

        assert delta("videogen_requests_total", outcome="success", code="OK") == 1
        assert delta("videogen_frames_generated_total") == 4
        for name, count in HISTOGRAMS.items():
            assert delta(f"{name}_count") == count, name
            assert delta(f"{name}_bucket", le="+Inf") == count, name
        assert delta("videogen_batch_size_sum") == 1
        assert delta("videogen_request_duration_seconds_sum") > 0
        for gauge in ("videogen_queue_depth", "videogen_inflight_requests", "videogen_instances_busy"):
            assert metric_value(after, gauge, **labels) == 0, gauge
        assert metric_value(after, "videogen_model_ready", **labels) == 1
        assert metric_value(after, "videogen_model_load_duration_seconds", **labels) > 0
        assert metric_value(after, "videogen_queue_capacity", **labels) == server.config.max_queue_size  # (config's 0)
        assert 'videogen_instances_stuck{model="m",version="1"} 0.0' in after  # (at 0 from the start, for the alert)
        assert metric_value(after, "videogen_model_warmup_duration_seconds", **labels) > 0
        mem = dict(labels, instance="0", device="cpu")
        assert metric_value(after, "videogen_device_memory_allocated_bytes", **mem) > 0
        assert metric_value(after, "videogen_request_peak_memory_bytes", **mem) > 0
        assert 'videogen_build_info{' in after and 'diffusers="' in after
        # the instance's busy time: the batch's, about the request's end to end (its queue wait and the
        # summary's sending apart), not the warm-up's
        busy = delta("videogen_instance_busy_seconds_total", instance="0")
        inside = sum(delta(f"videogen_{name}_seconds_sum") for name in ("image_encode", "denoise_step", "vae_decode_chunk"))
        assert 0 < inside <= busy <= delta("videogen_request_duration_seconds_sum") + 0.5  # (measured inside execute)
        # idle: no batch start
        assert "videogen_instance_batch_started_timestamp_seconds{" not in after
        # prometheus-client's process collector, and no _created series (metrics audit)
        assert metric_value(after, "process_resident_memory_bytes") > 0 and "_created" not in after
        # a rejected request counts under its code, with bounded labels
        with pytest.raises(grpc.RpcError):
            collect(server.stub(), request(model="m", width=7))
        assert server.metric("videogen_requests_total", model="m", outcome="rejected", code="INVALID_ARGUMENT") == 1
        # histogram buckets reach minutes
        assert 'le="600.0"' in after


def test_gauges_while_busy(make_repo):
    cfg = tiny_config("m", "dynamic_batching { default_queue_policy { max_queue_size: 4 } }")
    with ServerThread(make_repo({"m": cfg})) as server:
        running = Stream(server.stub(), request(model="m", num_inference_steps=20))
        running.progressed.wait(10)
        queued = Stream(server.stub(), request(model="m", num_inference_steps=1))
        queued.accepted.wait(10)
        text = server.scrape()
        assert metric_value(text, "videogen_instances_busy", model="m") == 1
        # the running batch's start (what VideoGenInstanceStalled reads), for that instance only
        started = metric_value(text, "videogen_instance_batch_started_timestamp_seconds", model="m", instance="0")
        assert time.time() - 60 < started <= time.time()
        assert metric_value(text, "videogen_inflight_requests", model="m") == 2
        assert metric_value(text, "videogen_queue_depth", model="m") == 1
        running.join(), queued.join()
        assert server.metric("videogen_queue_depth", model="m") == 0


def test_health_follows_loading_and_drain(make_repo):
    # A warm-up of several requests keeps the model loading long enough to look at health meanwhile.
    cfg = tiny_config("m", 'model_warmup [ { name: "w", inputs { key: "num_inference_steps" value: "3" } count: 4 } ]')
    server = ServerThread(make_repo({"m": cfg}), health_port=0)
    starting = threading.Thread(target=server.start)
    starting.start()
    seen = set()
    while starting.is_alive():
        if server.server is not None and server.server.port:
            try:
                seen.add(health(server))
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    try:
        assert NOT_SERVING in seen  # reachable and NOT_SERVING while loading and warming up
        assert health(server) == SERVING
        assert health(server, "videogen.v1.VideoGen") == SERVING
        assert health(server, "videogen.v1.VideoGen/m") == SERVING
        # List (grpc.health.v1's snapshot of every name; grpcio-health-checking's asyncio servicer answered it
        # UNIMPLEMENTED with Python's exception text: API audit)
        names = ("", "videogen.v1.VideoGen", "inference.GRPCInferenceService", "videogen.v1.VideoGen/m")
        assert health_list(server) == dict.fromkeys(names, SERVING)
        # a client-side health check (the SDK's with several servers) watches the API's name
        watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
            health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen"), timeout=60)
        assert next(watch).status == SERVING
        running = Stream(server.stub(), request(model="m", num_inference_steps=12))
        running.progressed.wait(10)
        import asyncio

        stop_future = asyncio.run_coroutine_threadsafe(server.server.stop(10), server.loop)
        assert next(watch).status == NOT_SERVING  # heard on the watch before the port closes
        # then GOAWAY and the port closed: no new call reaches it, health checks included
        wait_until(lambda: not port_answers(server.target), 10, "the port's close")
        # the probes' plaintext port answers NOT_SERVING for the whole drain
        probes = grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}")
        try:
            stub = health_pb2_grpc.HealthStub(probes)
            for name in names:
                assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == NOT_SERVING
            listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
            assert {name: answer.status for name, answer in listed.items()} == dict.fromkeys(names, NOT_SERVING)
        finally:
            probes.close()
        assert running.join().summary.num_frames == 4  # in-flight request finished during the drain
        stop_future.result(20)
    finally:
        server.stop()


def test_draining_server_refuses_new_requests(make_repo):
    """The engine's side of a drain (what a call that raced the GOAWAY meets, and an in-process
    caller), then the server's: its port closed, new calls and a readiness wait read UNAVAILABLE."""
    import asyncio

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from videogen.v1 import videogen_pb2 as pb
    from videogen_client import VideoGenClient
    from videogen_client.errors import DeadlineExceededError

    with ServerThread(make_repo({"m": tiny_config("m")})) as server:
        running = Stream(server.stub(), request(model="m", num_inference_steps=12))
        running.progressed.wait(10)
        server.engine.begin_drain()  # the drain's start, the port still open
        with pytest.raises(grpc.RpcError) as err:
            collect(server.stub(), request(model="m", num_inference_steps=1))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        # what a readiness wait reads: not ready (GetModel said READY, so `videogen wait-ready && generate`
        # went ahead at once and failed: black-box review of the SDK)
        info = server.stub().GetModel(pb.GetModelRequest(name="m"))
        assert info.state == pb.MODEL_STATE_UNLOADING and "draining" in info.versions[0].reason
        with VideoGenClient(server.target) as client, pytest.raises(DeadlineExceededError):
            client.wait_until_ready("m", timeout=0.5, poll_interval=0.1)
        # while KServe's metadata and config still describe the model (they failed "not ready")
        kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        assert kserve.ModelMetadata(kpb.ModelMetadataRequest(name="m"), timeout=10).versions == ["1"]
        assert kserve.ModelConfig(kpb.ModelConfigRequest(name="m", version="1"), timeout=10).config.name == "m"
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name="m"), timeout=10).ready
        # the server's stop: GOAWAY, the port closed; the call in flight goes on
        stop_future = asyncio.run_coroutine_threadsafe(server.server.stop(10), server.loop)
        wait_until(lambda: not port_answers(server.target), 10, "the port's close")
        with pytest.raises(grpc.RpcError) as err:
            collect(server.stub(), request(model="m", num_inference_steps=1))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with VideoGenClient(server.target) as client, pytest.raises(DeadlineExceededError):
            client.wait_until_ready("m", timeout=0.5, poll_interval=0.1)
        assert running.join().summary.num_frames == 4
        stop_future.result(20)


def test_a_drain_is_a_lame_duck_not_serving_before_its_goaway(make_repo, monkeypatch):
    """Health turns NOT_SERVING at the drain's start, for every name, while the server still serves (a
    client-side health check takes it out of rotation first: gRPC's core cancels a call that arrives
    as the port closes); a second signal ends the lame duck at once. A long one here, to look at it."""
    import asyncio
    import signal

    from videogen_server import app

    monkeypatch.setattr(app, "LAME_DUCK_SECONDS", 60.0)
    with ServerThread(make_repo({"m": tiny_config("m")}), drain_grace_seconds=120) as server:
        watch = health_pb2_grpc.HealthStub(server.channel()).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == SERVING
        stop_future = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
        assert next(watch).status == NOT_SERVING
        for name in ("", "videogen.v1.VideoGen", "inference.GRPCInferenceService", "videogen.v1.VideoGen/m"):
            assert health(server, name) == NOT_SERVING
        assert collect(server.stub(), request(model="m", num_frames=1, num_inference_steps=1))[-1].HasField("summary")
        # not ready everywhere else too (KServe's readiness and GetModel said ready through it: review)
        from inference import grpc_service_pb2 as kpb
        from inference import grpc_service_pb2_grpc as kpb_grpc
        from videogen.v1 import videogen_pb2 as pb

        kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        assert not kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name="m"), timeout=10).ready
        assert server.stub().GetModel(pb.GetModelRequest(name="m"), timeout=10).state == pb.MODEL_STATE_UNLOADING
        assert not stop_future.done()
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)  # as the first signal
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)  # the second: no more waiting
        wait_until(lambda: not port_answers(server.target), 10, "the port's close")
        stop_future.result(30)


@pytest.mark.parametrize("engine", ["busy", "idle"])
def test_a_call_grpc_took_before_the_goaway_is_served_though_its_image_arrives_after(make_repo, monkeypatch,
                                                                                     engine):
    """A call whose headers gRPC took before the drain's GOAWAY but whose message (the image: up to
    --max-request-bytes, on a slow link) arrives after it was refused "shutting down" by the draining
    engine (review), though nothing new can reach a closed port: it is admitted and served. On an idle
    engine the drain ended at once, and the close's second then cancelled the call: the drain now waits
    for the calls --max-concurrent-requests counts, from their start."""
    import asyncio

    from videogen_server import app

    monkeypatch.setattr(app, "LAME_DUCK_SECONDS", 0.2)
    with ServerThread(make_repo({"m": tiny_config("m")}), drain_grace_seconds=60) as server:
        running = None
        if engine == "busy":  # the drain lasts
            running = Stream(server.stub(), request(model="m", num_inference_steps=40, num_frames=2))
            assert running.progressed.wait(30) and running.error is None
        release = threading.Event()
        late = _held_upload(server, release)
        stop_future = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
        wait_until(lambda: not port_answers(server.target), 10, "the port's close")
        time.sleep(1.5)  # (past the close's second)
        release.set()
        assert late.join().summary.num_frames == 1, late.error
        assert running is None or running.join().summary.num_frames == 2
        stop_future.result(30)


def _held_upload(server: ServerThread, release: threading.Event) -> Stream:
    """A Generate call whose headers have reached the server and whose message (a tiny request) is sent
    once `release` is set: an image still arriving on a slow link."""
    import types

    from videogen.v1 import videogen_pb2 as pb

    def held():
        release.wait(60)
        yield request(model="m", num_frames=1, num_inference_steps=1)

    generate = server.channel().stream_stream("/videogen.v1.VideoGen/Generate",
                                              request_serializer=pb.GenerateRequest.SerializeToString,
                                              response_deserializer=pb.GenerateResponse.FromString)
    late = Stream(types.SimpleNamespace(Generate=lambda _req, **kw: generate(held(), **kw)), None, timeout=60)
    time.sleep(1.0)  # its headers reach the server (loopback: milliseconds)
    return late


def test_requests_still_running_when_the_drain_ends_are_errors_not_cancellations(make_repo):
    """At the drain's end the server stops what still runs: the caller hears UNAVAILABLE saying why, and
    metrics count an error (the error-rate alert sees it), not a caller's cancellation. A request still
    queued then was accepted but never started: it ends UNAVAILABLE marked not started (the SDK sends it
    again, to another server; it used to be lost as an error like the running one), counted rejected."""
    import asyncio

    with ServerThread(make_repo({"m": tiny_config("m")})) as server:
        running = Stream(server.stub(), request(model="m", num_inference_steps=100, num_frames=16))
        running.progressed.wait(10)
        queued = Stream(server.stub(), request(model="m", num_inference_steps=1, num_frames=1))
        queued.accepted.wait(10)
        asyncio.run_coroutine_threadsafe(server.server.stop(0.3), server.loop).result(60)
        for stream in (running, queued):
            assert stream.join().code() == grpc.StatusCode.UNAVAILABLE
        assert "drain grace of" in running.error.details()
        assert "before the request started" in queued.error.details() and "send it again" in queued.error.details()
        marked = {stream: dict(stream.error.trailing_metadata() or ()).get("x-videogen-not-started")
                  for stream in (running, queued)}
        assert marked == {running: None, queued: "1"}
        registry = server.server.metrics.registry
        labels = {"model": "m", "version": "1"}
        assert registry.get_sample_value("videogen_requests_total",
                                         {**labels, "outcome": "error", "code": "UNAVAILABLE"}) == 1
        assert registry.get_sample_value("videogen_requests_total",
                                         {**labels, "outcome": "rejected", "code": "UNAVAILABLE"}) == 1
        assert registry.get_sample_value("videogen_requests_total",
                                         {**labels, "outcome": "cancelled", "code": "CANCELLED"}) is None


def _slow_reader_done_on_the_device(server, inflight: int = 1):
    """A Generate whose device work is done while its caller reads nothing after Accepted: a small window
    and no BDP probing, so the server's writes of its raw frames (48 KiB each) wait for a reader that
    does not come. `inflight`: the requests in flight then, this one included. Returns (channel, call)."""
    from videogen.v1 import videogen_pb2_grpc

    slow = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0),
                                                         ("grpc.http2.lookahead_bytes", 16384)])
    call = videogen_pb2_grpc.VideoGenStub(slow).Generate(
        request(model="m", width=128, height=128, num_frames=16, num_inference_steps=1, decode_chunk_size=16,
                output={"frame_encoding": 3}), timeout=120)
    assert next(call).WhichOneof("event") == "accepted"
    labels = {"model": "m", "version": "1"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            server.metric("videogen_vae_decode_chunk_seconds_count", **labels) >= inflight
            and server.metric("videogen_instances_busy", **labels) == 0):
        time.sleep(0.1)
    assert server.metric("videogen_inflight_requests", **labels) == inflight, "device done, frames held back"
    return slow, call


def test_a_slow_reader_the_drain_ends_is_an_error_not_a_cancellation(make_repo):
    """A request whose device work is done but whose caller reads slowly (HTTP/2 flow control holds its
    frames back) is still in flight when the drain ends; the server's stop then cancels its stream, and
    it was counted as its caller's cancellation (found by a black-box review): the caller hears
    UNAVAILABLE, and so must the counters and the request log."""
    import asyncio

    with ServerThread(make_repo({"m": tiny_config("m")})) as server:
        slow, call = _slow_reader_done_on_the_device(server)
        asyncio.run_coroutine_threadsafe(server.server.stop(0.3), server.loop).result(60)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.counted(_REQUESTS, outcome="error", code="UNAVAILABLE", **_M) == 1
        assert server.counted(_REQUESTS, outcome="cancelled", code="CANCELLED", **_M) is None
        slow.close()


def test_a_slow_reader_an_unload_cuts_is_an_error_not_a_success(make_repo):
    """The same slow reader when an unload's timeout passes: the unload says it cancels the request, but
    its finished events were still queued, and once its caller read on it got every frame, the summary
    and OK, counted a success after its version was gone (chaos audit): it ends UNAVAILABLE, as in the
    drain."""
    from videogen.v1 import videogen_pb2 as pb

    with ServerThread(make_repo({"m": tiny_config("m")}), model_control_mode="explicit", load_models=("m",),
                      unload_timeout_seconds=1.0) as server:
        slow, call = _slow_reader_done_on_the_device(server)
        server.stub().UnloadModel(pb.UnloadModelRequest(name="m"), timeout=60)
        with pytest.raises(grpc.RpcError) as ended:
            for event in call:
                assert event.WhichOneof("event") != "summary"
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        assert server.counted(_REQUESTS, outcome="error", code="UNAVAILABLE", **_M) == 1
        assert server.counted(_REQUESTS, outcome="success", code="OK", **_M) is None
        slow.close()


def test_callers_that_do_not_read_hold_a_bounded_number_of_outputs(make_repo):
    """Requests done on the device whose callers never read held their frames in server memory, and
    admission counted only queued requests: one caller kept 30 beside a queue of 16 (security audit).
    With a queue of 1 and one instance, at most 1 + 2 requests are admitted and not ended: the next
    is refused QUEUE_FULL, naming the unread output, and is admitted again once they are read."""
    queue_of_one = "dynamic_batching { default_queue_policy { max_queue_size: 1 } }"
    with ServerThread(make_repo({"m": tiny_config("m", queue_of_one)})) as server:
        held = [_slow_reader_done_on_the_device(server)]
        labels = {"model": "m", "version": "1"}
        for _ in range(2):  # two more whose output nobody reads: done on the device one after the other
            channel, call = _slow_reader_done_on_the_device(server, inflight=len(held) + 1)
            held.append((channel, call))
        with pytest.raises(grpc.RpcError) as refused:
            collect(server.stub(), request(model="m", num_frames=1, num_inference_steps=1))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 requests in flight" in refused.value.details() and "not yet read" in refused.value.details()
        for channel, call in held:  # read on: each ends whole, and the server admits again
            assert list(call)[-1].WhichOneof("event") == "summary"
            channel.close()
        assert server.metric("videogen_inflight_requests", **labels) == 0
        assert collect(server.stub(), request(model="m", num_frames=1, num_inference_steps=1))[-1].summary


def test_metrics_listen_on_ipv6_and_ipv4_by_default(make_repo):
    """/metrics listened on 0.0.0.0 while gRPC and health took "[::]": on an IPv6-only cluster Prometheus
    could not scrape, so every alert on the metrics saw an instance down and KEDA read no load (deploy
    review). The default, "::", takes both (where this machine has no IPv6, IPv4 alone)."""
    import dataclasses
    import urllib.request

    from videogen_server.config import ServerConfig

    default = {f.name: f.default for f in dataclasses.fields(ServerConfig)}["metrics_host"]
    with ServerThread(make_repo({"m": tiny_config("m")}), metrics_host=default) as server:  # (tests pass 127.0.0.1)
        hosts = ["127.0.0.1"] + (["[::1]"] if ipv6_loopback() else [])
        for host in hosts:
            with urllib.request.urlopen(f"http://{host}:{server.server.metrics_port}/metrics", timeout=10) as r:
                assert "videogen_requests_total" in r.read().decode(), host


def test_a_taken_metrics_port_fails_the_start_naming_it_before_grpc_serves(make_repo):
    """/metrics was bound after the gRPC port had begun to serve: a taken metrics port stopped the start
    with only "[Errno 98] Address already in use" and a traceback (which port?), and an in-process server
    was left answering calls (user review). Now every port is bound before gRPC serves, the error names
    the port, and `videogen-server` says it in one line (exit 1), as it does for the gRPC port."""
    import socket
    import subprocess
    import sys

    from videogen_server.errors import PortUnavailable

    repo = make_repo({"m": tiny_config("m")})
    taken = socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a port free now, for the gRPC server
        grpc_port = probe.getsockname()[1]
    server = ServerThread(repo, port=grpc_port, metrics_port=taken.getsockname()[1])
    try:
        with pytest.raises(PortUnavailable, match=f"cannot bind the metrics port 127.0.0.1:{taken.getsockname()[1]}: "):
            server.start()
        with ServerThread(repo, port=grpc_port) as again:  # its gRPC port was let go, never having served
            assert again.port == grpc_port
        proc = subprocess.run([sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo),
                               "--port", "0", "--metrics-host", "127.0.0.1",
                               "--metrics-port", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"videogen-server: cannot bind the metrics port 127.0.0.1:{taken.getsockname()[1]}: " \
            in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    finally:
        server.server = None  # never started: nothing to stop but its loop
        server.stop()
        taken.close()


def test_reflection_lists_services_and_calls_generate_without_stubs(tiny_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(tiny_server.channel())
    services = set(db.get_services())
    assert {"videogen.v1.VideoGen", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("videogen.v1.VideoGen").methods_by_name["Generate"]
    assert method.input_type.full_name == "videogen.v1.GenerateRequest" and method.server_streaming
    # a generic client: message classes built from the reflected descriptors only
    Req = message_factory.GetMessageClass(method.input_type)
    Resp = message_factory.GetMessageClass(method.output_type)
    from ..helpers import sample_png

    call = tiny_server.channel().unary_stream("/videogen.v1.VideoGen/Generate", request_serializer=Req.SerializeToString,
                                              response_deserializer=Resp.FromString)
    events = [r.WhichOneof("event") for r in call(Req(model="svd-tiny", image=sample_png(), num_frames=1,
                                                        num_inference_steps=1))]
    assert events[0] == "accepted" and events[-1] == "summary"


def test_a_burst_of_refusals_is_summed_not_logged_line_by_line(tiny_server, caplog):
    """A server at its limits refused ~200 calls a second, a log line each (observability review): past
    10 a second they are summed in one line; every one is still in the log's count and the metric."""
    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    stub = pb_grpc.VideoGenStub(tiny_server.channel())
    before = tiny_server.metric("videogen_requests_total", code="NOT_FOUND")
    with caplog.at_level(logging.INFO, logger="videogen.requests"):
        calls = [stub.Generate(request(model="nope", num_frames=1, num_inference_steps=1), timeout=30)
                 for _ in range(40)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                list(call)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(1.5)  # the last summary's time
    lines = [r for r in caplog.records if r.name == "videogen.requests"]
    one_by_one = [r for r in lines if getattr(r, "videogen_request", None)]
    summed = [int(r.getMessage().split()[0]) for r in lines if "not logged one by one" in r.getMessage()]
    assert len(one_by_one) + sum(summed) == 40, [r.getMessage() for r in lines]
    assert summed, "40 refusals in well under a second, and none summed"  # (~50 ms on this machine)
    assert tiny_server.metric("videogen_requests_total", code="NOT_FOUND") - before == 40


def test_request_log_line_and_json_format(tiny_server, caplog):
    from videogen_server.logs import JsonFormatter

    with caplog.at_level(logging.INFO, logger="videogen.requests"):
        collect(tiny_server.stub(), request(num_frames=2, num_inference_steps=2, decode_chunk_size=1),
                metadata=(("x-request-id", "log-me"),))

        def mine() -> list[logging.LogRecord]:  # (logged by the generator's cleanup, after the last message)
            return [r for r in caplog.records if getattr(r, "videogen_request", {}).get("request_id") == "log-me"]

        wait_until(lambda: mine())
    records = mine()
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    req = line["request"]
    assert (req["model"], req["version"], req["outcome"], req["code"]) == ("svd-tiny", 1, "success", "OK")
    assert (req["width"], req["height"], req["frames"], req["steps"], req["decode_chunk_size"]) == (64, 48, 2, 2, 1)
    for key in ("queue_s", "image_encode_s", "denoise_s", "decode_s", "video_encode_s", "peak_memory_bytes"):
        assert key in req
    # refused once its version was chosen (a width past the limits): the line names the version too
    with caplog.at_level(logging.INFO, logger="videogen.requests"):
        with pytest.raises(grpc.RpcError):
            collect(tiny_server.stub(), request(width=4096), metadata=(("x-request-id", "too-wide"),))
    [refused] = [r.videogen_request for r in caplog.records
                 if getattr(r, "videogen_request", {}).get("request_id") == "too-wide"]
    assert (refused["version"], refused["outcome"], refused["code"]) == (1, "rejected", "INVALID_ARGUMENT"), refused


def test_a_json_log_is_json_on_every_line(make_repo, tmp_path):
    """`--log-format json` promises one JSON object per line, which log pipelines parse. transformers logs
    through a plain-text handler of its own (its lines: the next test), Python's warnings were printed as
    they come, and a fatal error's traceback too (deploy review). A real server process: start (a model
    that loads and one that fails), a request, a drain; then one that cannot start at all. transformers'
    "requires torchvision" WARNING at every start, which asked operators to install a package the server
    does not use, is no more."""
    import signal
    import subprocess
    import sys

    repo = make_repo({"m": tiny_config("m"), "bad": tiny_config("bad", parameters='parameters { key: "x" }')})
    port_file = tmp_path / "ports"
    serve = [sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo), "--port", "0",
             "--metrics-port", "-1", "--cpu-threads", "1", "--log-format", "json"]
    proc = subprocess.Popen([*serve, "--port-file", str(port_file)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            from videogen.v1 import videogen_pb2_grpc

            assert collect(videogen_pb2_grpc.VideoGenStub(channel), request(model="m", num_frames=1,
                                                                            num_inference_steps=1))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    failed = subprocess.run([*serve, "--exit-on-error"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    lines = [line for line in (stderr + failed.stderr).splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
    loggers = {entry["logger"] for entry in parsed}
    assert "videogen.requests" in loggers, loggers
    assert not [entry for entry in parsed if "torchvision" in entry["message"]]
    assert any("exit on error: bad" in entry["message"] and entry["level"] == "CRITICAL" for entry in parsed)


def test_a_json_log_takes_what_no_thread_caught_and_library_failures():
    """The same promise for an exception no thread caught, or that Python could not raise (both printed
    raw by Python), and for a library whose import fails: its loggers are left alone, nothing raised
    (reviews of the change)."""
    import subprocess
    import sys

    code = """
import sys, threading, types
from videogen_server import logs
logs.setup("json", "CRITICAL")
logs.setup("json")  # a second set-up (a level change) keeps Python's own hook to hand over to
assert logs._python_excepthook is threading.__excepthook__
sys.modules["transformers"] = types.ModuleType("transformers")  # installed but broken: find_spec raises
logs.adopt_library_loggers()
t = threading.Thread(target=lambda: 1 / 0, name="worker")
t.start(); t.join()
class Leaky:
    def __del__(self):
        raise RuntimeError("in __del__")
Leaky()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    [entry] = [e for e in lines if "uncaught exception in thread worker" in e["message"]]
    assert entry["level"] == "ERROR" and "ZeroDivisionError" in entry["exc"]
    [entry] = [e for e in lines if e["message"].startswith("exception ignored in")]
    assert entry["level"] == "WARNING" and "in __del__" in entry["exc"]


def test_a_json_log_takes_torchs_own_lines_and_messages_that_cannot_be_formatted():
    """torch's loggers write through stderr handlers of their own: the warning that says why compile
    artifacts could not be used came out as 11 text lines in a JSON log; and a record whose arguments do not
    fit its message printed logging's multi-line error block (observability review). transformers' and
    diffusers' plain-text handlers ("[transformers] ..." lines) are replaced too."""
    import subprocess
    import sys

    code = """
import logging, torch
from videogen_server import logs
logs.setup("json")
logs.adopt_library_loggers()
torch.compiler.load_cache_artifacts(b"garbage")  # torch warns, with a traceback
from transformers.utils import logging as transformers_logging
from diffusers.utils import logging as diffusers_logging
transformers_logging.get_logger("transformers.some_module").warning("from transformers")
diffusers_logging.get_logger("diffusers.some_module").warning("from diffusers")
logging.getLogger("some.library").info("%d frames", "x")
logging.getLogger("some.library").warning("where", stack_info=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = []
    for line in proc.stderr.splitlines():
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not JSON: {line!r}\n{proc.stderr[-3000:]}") from None
    [torch_line] = [e for e in lines if e["logger"].startswith("torch")]
    assert "un-pickle" in torch_line["message"] and torch_line["level"] == "WARNING", torch_line
    [odd] = [e for e in lines if e["logger"] == "some.library" and e["level"] == "INFO"]
    assert odd["message"] == "%d frames % ('x',) (not formatted: TypeError)", odd
    [where] = [e for e in lines if e["message"] == "where"]
    assert "Stack (most recent call last)" in where["stack"]
    assert {e["logger"] for e in lines if e["message"] in ("from transformers", "from diffusers")} == {
        "transformers.some_module", "diffusers.some_module"}


def test_the_compose_healthcheck_reads_the_health_port(make_repo):
    """deploy/compose's healthcheck command, run as Docker would (against this server's health port
    instead of the image's 8003): exit 0 while SERVING, 1 once the server drains."""
    import asyncio
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    compose = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "docker-compose.yml"
    test = yaml.safe_load(compose.read_text())["services"]["videogen"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "127.0.0.1:8003" in test[3]
    with ServerThread(make_repo({"m": tiny_config("m")}), health_port=0) as server:
        code = test[3].replace("127.0.0.1:8003", f"127.0.0.1:{server.server.health_port}")

        def check() -> int:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode

        assert check() == 0
        server.engine.begin_drain()
        asyncio.run_coroutine_threadsafe(server.server._health.update(), server.loop).result(10)
        assert check() == 1



def test_a_second_signal_ends_the_wait_for_an_image_still_arriving(make_repo, monkeypatch):
    """The drain waits for a call whose image is still arriving (--max-concurrent-requests counts it);
    a second signal must end that wait at once, as it ends the grace: it did not on an idle engine, and
    the wait spun the loop until the grace's end (review)."""
    import asyncio
    import signal

    from videogen_server import app

    monkeypatch.setattr(app, "LAME_DUCK_SECONDS", 0.2)
    with ServerThread(make_repo({"m": tiny_config("m")}), drain_grace_seconds=60) as server:
        release = threading.Event()
        late = _held_upload(server, release)
        stop_future = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
        wait_until(lambda: not port_answers(server.target), 10, "the port's close")
        time.sleep(0.5)
        assert not stop_future.done()  # waiting for the image
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)  # (the first was stop())
        server.loop.call_soon_threadsafe(server.server._on_signal, signal.SIGTERM)  # the second
        stop_future.result(10)
        release.set()
        assert late.join().error is not None
