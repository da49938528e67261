"""A refused request's memory is given back when its call ends, not when Python's cyclic collector next
runs: a reference cycle through a refused call's frames held its request (the image in it, up to
--max-request-bytes) until then, and a burst of refused 60 MiB requests held GBs of a server's memory
while it idled (a resource review). Real servers on loopback; Python's collector is paused while each
call runs, and what it would have collected is then looked at."""
from __future__ import annotations

import gc
import logging
import time
import types

import grpc
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import ServerThread, collect, request, sample_png, wait_until

MODEL = "svd-tiny"


def _frames_left_in_cycles(action, caplog) -> list[str]:
    """The server's frames (videogen_server code) that `action` left in reference cycles. gRPC's errors
    fail it first: a record's traceback keeps what it reaches out of the collector's garbage (a callback
    of the fix that failed at every refusal hid its cycles so)."""
    gc.collect()
    gc.disable()
    try:
        with caplog.at_level(logging.ERROR, "grpc"):
            action()
            time.sleep(0.5)  # the calls' own ends on the server (their handlers' tasks, done callbacks)
        grpc_errors = [r.getMessage() for r in caplog.records if r.name.startswith("grpc") and r.levelno >= logging.ERROR]
        assert not grpc_errors, grpc_errors
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
                       for frame in gc.garbage if isinstance(frame, types.FrameType)
                       and "videogen_server" in frame.f_code.co_filename})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_refused_calls_leave_no_cycles_holding_their_requests(tiny_model_source, tmp_path, caplog):
    import shutil

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    infer = kpb.ModelInferRequest(model_name=MODEL)
    infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(sample_png())
    infer.inputs.add(name="width", datatype="INT32", shape=[1]).contents.int_contents.append(65)
    with ServerThread(tmp_path) as server:
        stub, kserve = server.stub(), kpb_grpc.GRPCInferenceServiceStub(server.channel())
        collect(stub, request(num_inference_steps=1, num_frames=1))  # imports and first-call work done

        def refusals():
            for _ in range(3):
                assert _refused(lambda: collect(stub, request(width=65))) == grpc.StatusCode.INVALID_ARGUMENT
                # refused while decoding, in the preprocessing threads: through concurrent and asyncio futures
                assert _refused(lambda: collect(stub, request(image=b"not an image" * 1000))) == \
                    grpc.StatusCode.INVALID_ARGUMENT
                assert _refused(lambda: kserve.ModelInfer(infer, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
                [answer] = list(kserve.ModelStreamInfer(iter([infer]), timeout=30))
                assert answer.error_message.startswith("width")

        assert _frames_left_in_cycles(refusals, caplog) == []


def test_unauthenticated_calls_leave_no_cycles_holding_their_requests(tiny_model_source, tmp_path, caplog):
    """The denied call's raw message (not parsed) stayed with its handler's frame."""
    import shutil

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, auth_tokens=("secret",)) as server:
        stub = server.stub()

        def refusals():
            for _ in range(3):
                assert _refused(lambda: collect(stub, request())) == grpc.StatusCode.UNAUTHENTICATED
                assert _refused(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10)) \
                    == grpc.StatusCode.UNAUTHENTICATED

        assert _frames_left_in_cycles(refusals, caplog) == []


def test_failed_and_cancelled_requests_leave_no_cycles_holding_them(make_repo, caplog):
    """Ended after admission: a backend error at a step (fault injection: what the device would raise)
    and a caller that cancels while its request runs."""
    from ..helpers import TINY_PARAMETERS, Stream, tiny_config

    faulty = tiny_config("m", parameters=TINY_PARAMETERS + 'parameters { key: "fault_injection" '
                                                            'value { string_value: "error@2:seed=666" } }')
    with ServerThread(make_repo({"m": faulty})) as server:
        stub = server.stub()
        collect(stub, request(model="m", num_inference_steps=1, num_frames=1))

        def ended():
            for _ in range(2):
                assert _refused(lambda: collect(stub, request(model="m", seed=666, num_inference_steps=4))) \
                    == grpc.StatusCode.INTERNAL
                running = Stream(stub, request(model="m", num_inference_steps=30))
                assert running.progressed.wait(30)
                running.call.cancel()
                running.join()
                wait_until(lambda: server.metric("videogen_inflight_requests", model="m") == 0, 30, "the cancel")

        assert _frames_left_in_cycles(ended, caplog) == []


def test_refusals_stay_retryable_by_grpcs_retry_policy(tiny_model_source, tmp_path):
    """A refusal ends the call with its status alone (no headers, no message: "Trailers-Only"), which
    gRPC's retry policy retries; a unary handler that set its code and returned (a way to free the request
    without the above) sent headers and an empty message first, and a Triton client's ModelInfer was then
    not retried (1 attempt of 4, a review found)."""
    import json
    import shutil

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    def retrying(target: str, service: str) -> grpc.Channel:
        policy = {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE", "NOT_FOUND"]}
        config = {"methodConfig": [{"name": [{"service": service}], "retryPolicy": policy}]}
        return grpc.insecure_channel(target, options=[("grpc.enable_retries", 1),
                                                      ("grpc.service_config", json.dumps(config))])

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    infer = kpb.ModelInferRequest(model_name=MODEL)
    infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(sample_png())
    with ServerThread(tmp_path) as server:
        server.run(server.engine.unload_model(MODEL))  # refused as not loaded: UNAVAILABLE / Triton's NOT_FOUND

        def attempts() -> float:
            return server.metric("videogen_requests_total", model=MODEL, outcome="rejected")

        with retrying(server.target, "inference.GRPCInferenceService") as channel:
            assert _refused(lambda: kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=30)) \
                == grpc.StatusCode.NOT_FOUND
        assert attempts() == 4
        with retrying(server.target, "videogen.v1.VideoGen") as channel:
            assert _refused(lambda: list(pb_grpc.VideoGenStub(channel).Generate(request(), timeout=30))) \
                == grpc.StatusCode.UNAVAILABLE
        assert attempts() == 8
