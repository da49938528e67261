"""--max-concurrent-requests: the calls carrying an image, bounded before their messages are read.

gRPC reads a unary call's whole message before its handler runs and bounds neither how many nor how
large together: a burst of large requests took a server's memory up by ~1.5x their size whatever became
of them (a resource review: 40 concurrent 60 MiB requests, +3.6 GB, each then refused). Real servers on
loopback; the memory checks run the server in a process of its own and read its resident memory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen.v1 import videogen_pb2 as pb
from videogen.v1 import videogen_pb2_grpc as pb_grpc

from ..helpers import ServerThread, collect, request, sample_png, wait_until
from .test_error_details import details_of
from .test_scale_out import _spawn, _wait_ready

MODEL = "svd-tiny"
# 16 RAW frames of 64x48 and their MP4: past a 64 KiB receive window, so a caller that does not read
# keeps its call in flight (and its place) until it cancels
HELD = dict(num_frames=16, num_inference_steps=2, output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB})
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _held_call(target: str, metadata=()):
    """A Generate the caller accepts and then does not read: in flight until cancelled."""
    channel = grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.VideoGenStub(channel).Generate(request(**HELD), timeout=120, metadata=metadata)
    assert next(call).WhichOneof("event") == "accepted"
    return channel, call


def _refused_busy(server: ServerThread) -> float:
    return server.metric("videogen_requests_total", model="", outcome="rejected", code="RESOURCE_EXHAUSTED")


def test_a_request_over_the_limit_is_refused_at_once_and_the_place_comes_back(tiny_model_source, tmp_path):
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, max_concurrent_requests=1) as server:
        # its refusals' series is there at 0 before the first (VideoGenQueueFull's increase() counts that one)
        assert [line.split()[-1] for line in server.scrape().splitlines()
                if line.startswith("videogen_requests_total{") and 'model=""' in line
                and 'outcome="rejected"' in line and 'code="RESOURCE_EXHAUSTED"' in line] == ["0.0"]
        stub = server.stub()
        channel, held = _held_call(server.target)
        try:
            # Generate: RESOURCE_EXHAUSTED, named, with a retry delay and gRPC's pushback, the caller's id echoed
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, request(), metadata=(("x-request-id", "over-1"),))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-requests" in err.value.details()
            details = details_of(err.value)
            assert details["ErrorInfo"].reason == "SERVER_BUSY"
            assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1000
            trailer = dict(err.value.trailing_metadata())
            assert trailer["x-request-id"] == "over-1" and trailer["grpc-retry-pushback-ms"] == "1000"
            # KServe's ModelInfer: Triton's code for a server that cannot take more (UNAVAILABLE)
            infer = kpb.ModelInferRequest(model_name=MODEL)
            infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(sample_png())
            with pytest.raises(grpc.RpcError) as err:
                kpb_grpc.GRPCInferenceServiceStub(server.channel()).ModelInfer(infer, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details_of(err.value)["ErrorInfo"].reason == "SERVER_BUSY"
            # the SDK: a full queue's error, its reason said (no retries here: they would wait for the place)
            from videogen_client import QueueFullError, VideoGenClient

            with VideoGenClient(server.target, retry=False) as client, pytest.raises(QueueFullError) as sdk:
                list(client.generate(sample_png(), model=MODEL, num_frames=1, num_inference_steps=1))
            assert sdk.value.error_reason == "SERVER_BUSY"
            # counted (model unknown: the message was never read) and logged as refusals are
            assert _refused_busy(server) == 3
            # the other calls are not limited: health, the model's status
            health = health_pb2_grpc.HealthStub(server.channel())
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert stub.GetModel(pb.GetModelRequest(name=MODEL), timeout=10).name == MODEL
        finally:
            held.cancel()
            channel.close()
        # the place comes back with the call's end
        wait_until(lambda: server.metric("videogen_inflight_requests", model=MODEL) == 0, 30, "the held call ended")
        wait_until(lambda: _ok(stub), 30, "a request served once the held one ended")
        assert collect(stub, request(num_inference_steps=1))[-1].WhichOneof("event") == "summary"
        assert _refused_busy(server) == 3


def _ok(stub) -> bool:
    try:
        return collect(stub, request(num_inference_steps=1, num_frames=1))[-1].WhichOneof("event") == "summary"
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the held call's end not yet seen
        return False


def test_the_limit_counts_calls_not_requests_admitted(tiny_model_source, tmp_path):
    """Places are held from a call's start to its end, whatever its end: refused for a bad field, done,
    or cancelled by its caller while it ran, a call gives its place back."""
    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, max_concurrent_requests=1) as server:
        stub = server.stub()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, request(width=65))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert collect(stub, request(num_inference_steps=1, num_frames=1))[-1].WhichOneof("event") == "summary"
            channel, held = _held_call(server.target)
            held.cancel()
            channel.close()
            wait_until(lambda: _ok(stub), 30, "the place of a cancelled call back")


# -- memory, with the server in a process of its own -------------------------------------------------

BURST, BURST_MIB = 8, 48  # over the model's 32 MiB image limit, under the server's 64 MiB message limit


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _burst_peak(pid: int, target: str, metadata) -> tuple[list[grpc.StatusCode], float]:
    """BURST concurrent Generate calls with a BURST_MIB image, each on its own connection: their status
    codes, and the server's resident memory at its highest while they ran, over what it was before."""
    big = request(image=os.urandom(BURST_MIB * 2**20))
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                       ("grpc.max_send_message_length", 128 * 2**20)])
                for _ in range(BURST)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    before, peak, done = _rss_mib(pid), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.005)

    def call(channel) -> grpc.StatusCode:
        try:
            collect(pb_grpc.VideoGenStub(channel), big, timeout=60, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(BURST) as pool:
            codes = list(pool.map(call, channels))
        time.sleep(0.3)
    finally:
        done.set()
        sampler.join()
        for channel in channels:
            channel.close()
    return codes, peak[0] - before


@contextlib.contextmanager
def _server_process(tmp_path, tiny_model_source, *args: str):
    """A server process on the tiny model (test_scale_out's), one request served."""
    server = _spawn(tmp_path, tiny_model_source, *args)
    try:
        _wait_ready([server])
        with grpc.insecure_channel(server.target) as channel:  # a served call first: what the first request
            # imports and allocates is not counted in the bursts
            assert collect(pb_grpc.VideoGenStub(channel), request(num_inference_steps=1), metadata=AUTH
                           )[-1].WhichOneof("event") == "summary"
        yield server
    finally:
        server.process.kill()
        server.process.wait(10)


def test_calls_refused_over_the_limit_are_not_read(tmp_path, tiny_model_source):
    """Read first (as gRPC's unary handlers do), 8 concurrent 48 MiB calls took the server's memory up by
    ~1.5x their 384 MiB before each was refused."""
    total = BURST * BURST_MIB
    with _server_process(tmp_path, tiny_model_source, "--max-concurrent-requests", "1") as server:
        frames = server.metric("videogen_frames_generated_total", model=MODEL)
        channel, held = _held_call(server.target)  # the one place taken
        try:
            # its video made (what that allocates is not counted below), its frames waiting for its caller
            wait_until(lambda: server.metric("videogen_frames_generated_total", model=MODEL) > frames, 60,
                       "the held call's first frames")
            wait_until(lambda: server.metric("videogen_instances_busy", model=MODEL) == 0, 60,
                       "the held call's video made")
            time.sleep(0.5)
            codes, grew = _burst_peak(server.process.pid, server.target, metadata=())
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * BURST
            assert grew < total / 4, f"+{grew:.0f} MiB for {total} MiB refused over the limit"
        finally:
            held.cancel()
            channel.close()
        assert server.metric("videogen_requests_total", model="", code="RESOURCE_EXHAUSTED") == BURST


def test_calls_refused_without_a_token_are_not_read(tmp_path, tiny_model_source):
    """The same for a caller without a token (no limit, so that authentication alone refuses)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    total = BURST * BURST_MIB
    with _server_process(tmp_path, tiny_model_source, "--max-concurrent-requests", "0",
                         "--auth-token-file", str(tokens)) as server:
        codes, grew = _burst_peak(server.process.pid, server.target, metadata=())
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * BURST
        assert grew < total / 4, f"+{grew:.0f} MiB for {total} MiB refused without a token"


def test_a_call_that_never_sends_its_request_gives_its_place_back(tiny_model_source, tmp_path):
    """A stream that only opens (HEADERS, no message) held a place for as long as its connection lived."""
    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, max_concurrent_requests=1, request_read_timeout_seconds=1.0) as server:
        release = threading.Event()

        def never_sends():
            release.wait(30)
            return
            yield  # pragma: no cover - a request iterator that ends without a message, once released

        # Generate's path with a streaming request: the same frames as a unary call, but no message yet
        t0 = time.monotonic()  # before the call: a pause after it cannot shorten what is measured
        stalled = server.channel().stream_stream(
            "/videogen.v1.VideoGen/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString)(never_sends(), timeout=30,
                                                                   metadata=(("x-request-id", "silent-1"),))
        try:
            with pytest.raises(grpc.RpcError) as err:
                next(stalled)
            assert 0.8 < time.monotonic() - t0 < 10
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--request-read-timeout-seconds" in err.value.details()
            assert details_of(err.value)["ErrorInfo"].reason == "REQUEST_NOT_SENT"
            assert dict(err.value.trailing_metadata())["x-request-id"] == "silent-1"
            # its place is free: a request is served, not refused as over the limit
            assert collect(server.stub(), request(num_inference_steps=1))[-1].WhichOneof("event") == "summary"
            assert server.metric("videogen_requests_total", model="", code="DEADLINE_EXCEEDED") == 1
        finally:
            release.set()


def test_a_call_that_ends_without_its_request_is_refused_and_counted(tiny_model_source, tmp_path):
    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, max_concurrent_requests=1) as server:
        empty = server.channel().stream_stream(
            "/videogen.v1.VideoGen/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString)(iter(()), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(empty)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(err.value)["ErrorInfo"].metadata["field"] == "request"
        assert server.metric("videogen_requests_total", model="", outcome="rejected", code="INVALID_ARGUMENT") == 1
        # its place came back
        assert collect(server.stub(), request(num_inference_steps=1))[-1].WhichOneof("event") == "summary"
