"""A caller that stops reading its stream (--stream-send-timeout-seconds).

gRPC's flow control holds a message back until the caller reads, while the model goes on producing the
video: without a limit, a caller whose process stopped reading (yet still answers keepalive pings) held its
whole video's frames, and its place in flight, for as long as its connection lived. Real servers on
loopback; the clients turn off BDP probing, so their receive window stays at gRPC's 64 KiB and a few RAW
frames fill it.
"""
from __future__ import annotations

import logging
import time

import grpc
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import ServerThread, collect, request, sample_png, wait_until
from .test_error_details import details_of

MODEL = "svd-tiny"
# 16 RAW frames of 64x48 (9 KiB each) and their MP4: well past a 64 KiB window
BIG = dict(num_frames=16, num_inference_steps=2, output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB})


def _small_window(server: ServerThread) -> grpc.Channel:
    return grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])


def _stalled(server: ServerThread) -> float:
    return server.metric("videogen_requests_total", model=MODEL, outcome="error", code="DEADLINE_EXCEEDED")


def test_a_caller_that_stops_reading_is_cut_off_and_told_why(tiny_model_source, tmp_path):
    import shutil

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    # 3 s: the last request's fast reader may stop for a ~2 s pause of this process's garbage collector
    with ServerThread(tmp_path, stream_send_timeout_seconds=3.0) as server, _small_window(server) as channel:
        from videogen.v1 import videogen_pb2_grpc as pb_grpc

        call = pb_grpc.VideoGenStub(channel).Generate(request(**BIG), timeout=60)
        assert next(call).WhichOneof("event") == "accepted"
        # not reading: the server ends the request, frees it and counts it, while the caller still sleeps
        wait_until(lambda: _stalled(server) == 1, 30, "the stalled request counted")
        wait_until(lambda: server.metric("videogen_inflight_requests", model=MODEL) == 0, 10, "nothing in flight")
        # reading again: what was in flight, then the status saying why (not the caller's own deadline, 60 s)
        t0 = time.monotonic()
        read = []
        with pytest.raises(grpc.RpcError) as err:
            for message in call:
                read.append(message.WhichOneof("event"))
        assert time.monotonic() - t0 < 10
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "took no message for 3s" in err.value.details() and "--stream-send-timeout-seconds" in err.value.details()
        assert details_of(err.value)["ErrorInfo"].reason == "READER_STALLED"
        assert "summary" not in read and read.count("frame") < 16, read
        # the server serves on
        assert collect(server.stub(), request(**BIG))[-1].WhichOneof("event") == "summary"
        assert _stalled(server) == 1


def test_a_slow_but_steady_reader_is_not_cut_off(tiny_model_source, tmp_path):
    """The limit is on one message's wait, not on the stream's: a caller reading a message every 0.3 s
    (~30 KiB/s, a slow link) gets its whole video (~7.5 s from the call) under a 5 s limit. A write waits
    until the caller has read what its window holds (64 KiB here: ~2.1 s at that pace), so the limit
    amounts to a least pace of window / limit. The 2.9 s to spare cover a pause of this process's garbage
    collector (tests/gc_pauses.py), which stops the reader while the server's clock runs."""
    import shutil

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, stream_send_timeout_seconds=5.0) as server, _small_window(server) as channel:
        from videogen.v1 import videogen_pb2_grpc as pb_grpc

        read = []
        for message in pb_grpc.VideoGenStub(channel).Generate(request(**BIG), timeout=60):
            read.append(message.WhichOneof("event"))
            time.sleep(0.3)
        assert read.count("frame") == 16 and read[-1] == "summary"
        assert _stalled(server) == 0


def test_a_kserve_stream_whose_client_stops_reading_ends_with_the_status(tiny_model_source, tmp_path, caplog):
    """ModelStreamInfer: a response that waits on the client ends the stream (its requests still running
    with it) with the same status, which follows the responses in flight. Its request had finished (the
    stream queues responses apart from the engine, up to STREAM_MAX_QUEUED): without the stream's own
    limit, the stream and its queued responses stayed, and the client never heard why."""
    import shutil
    import threading

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    req = kpb.ModelInferRequest(model_name=MODEL, id="big")
    req.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(sample_png())
    req.inputs.add(name="num_frames", datatype="INT32", shape=[1]).contents.int_contents.append(16)
    req.inputs.add(name="num_inference_steps", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    req.outputs.add(name="frames")
    done = threading.Event()
    caplog.set_level(logging.INFO, "videogen_server.transport.kserve")

    def requests():
        yield req
        done.wait(60)  # the client keeps its side open

    with ServerThread(tmp_path, stream_send_timeout_seconds=1.0) as server, _small_window(server) as channel:
        call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
        try:
            wait_until(lambda: server.metric("videogen_requests_total", model=MODEL, code="OK") == 1, 30,
                       "the request done")
            wait_until(lambda: any("ModelStreamInfer: the caller took no message for 1s" in r.getMessage()
                                   for r in caplog.records), 10, "the stream ended")
            t0 = time.monotonic()
            read = []
            with pytest.raises(grpc.RpcError) as err:
                for response in call:
                    assert not response.error_message
                    read.append(response)
            assert time.monotonic() - t0 < 10
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-send-timeout-seconds" in err.value.details()
            assert 0 < len(read) < 17  # 16 frames and the final response
        finally:
            done.set()


def test_the_rpc_span_of_a_stalled_call_has_the_callers_status(tiny_model_source, tmp_path, monkeypatch):
    """The RPC's span said CANCELLED (the handler's task was cancelled) where the caller reads
    DEADLINE_EXCEEDED (a review found)."""
    import shutil

    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    from ..otlp import Collector, attrs

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    collector = Collector()
    try:
        with ServerThread(tmp_path, stream_send_timeout_seconds=1.0, otlp_endpoint=collector.endpoint) as server, \
                _small_window(server) as channel:
            call = pb_grpc.VideoGenStub(channel).Generate(request(**BIG), timeout=60)
            assert next(call).WhichOneof("event") == "accepted"
            collector.wait("the RPC's span", lambda spans: any(s.name == "videogen.v1.VideoGen/Generate"
                                                               for s in spans))
            [rpc] = [s for s in collector.spans if s.name == "videogen.v1.VideoGen/Generate"]
            assert attrs(rpc)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            call.cancel()
    finally:
        collector.stop()
