"""gRPC's rich error model: every refusal carries a google.rpc.Status with machine-readable details.

Read here two ways: with grpc's own reader (grpcio-status's `rpc_status.from_call`, which also checks
that the details' code and message are the call's, as a client in any language would rely on), and
through the SDK's typed errors.
"""
from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2

from videogen.v1 import videogen_pb2 as pb
from videogen.v1 import videogen_pb2_grpc as pb_grpc
from videogen_client import VideoGenClient
from videogen_client.errors import (InvalidArgumentError, ModelNotFoundError, OutOfMemoryError, QueueFullError,
                                    UnauthenticatedError)

from ..helpers import SHORT_REQUEST as SHORT
from ..helpers import TINY_PARAMETERS, ServerThread, collect, details_of, full_queue, request, sample_png, tiny_config


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_an_invalid_field_is_named_in_a_bad_request_detail(tiny_server):
    err = refusal(lambda: collect(tiny_server.stub(), request(width=65)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details_of(err)
    info = found["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == ("INVALID_FIELD", "videogen.v1", {"field": "width"})
    [violation] = found["BadRequest"].field_violations
    assert violation.field == "width" and "multiple of 8" in violation.description
    assert err.details() == f"width: {violation.description}"

    # the SDK takes field and reason from the detail
    with VideoGenClient(tiny_server.target) as client, pytest.raises(InvalidArgumentError) as typed:
        client.run(sample_png(), model="svd-tiny", width=65)
    assert (typed.value.field, typed.value.reason, typed.value.error_reason) == \
        ("width", violation.description, "INVALID_FIELD")


def test_an_unknown_model(tiny_server):
    err = refusal(lambda: collect(tiny_server.stub(), request(model="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and details_of(err)["ErrorInfo"].reason == "MODEL_NOT_FOUND"
    with VideoGenClient(tiny_server.target) as client, pytest.raises(ModelNotFoundError) as typed:
        client.get_model("nope")
    assert typed.value.error_reason == "MODEL_NOT_FOUND"


def test_a_full_queue_says_when_to_retry(make_repo):
    from videogen_server.transport.status import QUEUE_FULL_RETRY_DELAY_S

    cfg = tiny_config("m", "dynamic_batching { default_queue_policy { max_queue_size: 1 } }")
    with full_queue(make_repo({"m": cfg})) as server:
        err = refusal(lambda: collect(server.stub(), request(model="m", **SHORT)))
        found = details_of(err)
        with VideoGenClient(server.target, retry=False) as client, pytest.raises(QueueFullError) as typed:
            client.run(sample_png(), model="m", **{k: v for k, v in SHORT.items() if k != "output"})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert found["ErrorInfo"].reason == "QUEUE_FULL"
    assert found["RetryInfo"].retry_delay.ToMilliseconds() == QUEUE_FULL_RETRY_DELAY_S * 1000
    assert (typed.value.error_reason, typed.value.retry_delay) == ("QUEUE_FULL", QUEUE_FULL_RETRY_DELAY_S)


def pushback_of(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")


def test_a_full_queue_pushes_back_grpc_retries(make_repo, monkeypatch):
    """A full queue also answers with gRPC's pushback trailer (`grpc-retry-pushback-ms`), which gRPC's
    own retries wait instead of their backoff, and -1 (no retry) when the caller's deadline would end
    first. No run measured yet here, so the wait is the default, set to 3 s for this test (1 s in the
    server): through the SDK's default retry policy (4 attempts, backoff 0.1 s doubling) with 5.9 s left,
    the second attempt comes 3 s in, is told not to retry (2.9 s left, less than the wait), and the
    caller hears QUEUE_FULL then, two refusals in all. Either refusal may come up to ~2.9 s late (a pause
    of this process's garbage collector, tests/gc_pauses.py, while gRPC's core keeps the deadline) and
    the outcome holds. Without the pushback gRPC made four attempts within ~0.7 s (a 0.1-0.4 s backoff
    each), all refused."""
    from videogen_server.transport import status

    monkeypatch.setattr(status, "QUEUE_FULL_RETRY_DELAY_S", 3.0)
    monkeypatch.setattr(status, "MAX_RETRY_PUSHBACK_S", 3.0)
    cfg = tiny_config("m", "dynamic_batching { default_queue_policy { max_queue_size: 1 } }")
    with full_queue(make_repo({"m": cfg}), running_request=dict(num_inference_steps=100, num_frames=4)) as server:
        plain = refusal(lambda: collect(server.stub(), request(model="m", **SHORT)))
        short = refusal(lambda: collect(server.stub(), request(model="m", **SHORT), timeout=2.9))
        before = server.metric("videogen_requests_total", outcome="rejected", code="RESOURCE_EXHAUSTED")
        t0 = time.monotonic()
        with VideoGenClient(server.target) as client, pytest.raises(QueueFullError) as typed:
            client.run(sample_png(), model="m", timeout=5.9, **{k: v for k, v in SHORT.items() if k != "output"})
        took = time.monotonic() - t0
        refused = server.metric("videogen_requests_total", outcome="rejected", code="RESOURCE_EXHAUSTED") - before
    assert pushback_of(plain) == "3000"
    assert pushback_of(short) == "-1" and details_of(short)["RetryInfo"].retry_delay.ToMilliseconds() == 3000
    assert typed.value.retry_delay == 3.0
    assert refused == 2, refused
    assert 2.7 <= took < 5.9, took


def test_out_of_memory_is_told_apart_from_a_full_queue_by_its_reason(make_repo):
    cfg = tiny_config("m", parameters=TINY_PARAMETERS + 'parameters { key: "fault_injection" '
                                                        'value { string_value: "oom@2:seed=666" } }')
    with ServerThread(make_repo({"m": cfg})) as server:
        err = refusal(lambda: collect(server.stub(), request(model="m", seed=666, num_inference_steps=3,
                                                              num_frames=2)))
        with VideoGenClient(server.target) as client, pytest.raises(OutOfMemoryError) as typed:
            client.run(sample_png(), model="m", seed=666, num_inference_steps=3, num_frames=2)
    found = details_of(err)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and found["ErrorInfo"].reason == "OUT_OF_MEMORY"
    assert "RetryInfo" not in found  # the same request would fail the same way
    assert typed.value.error_reason == "OUT_OF_MEMORY" and typed.value.retry_delay is None


def test_a_refused_token_and_a_bad_model_config(make_repo):
    repo = make_repo({"m": tiny_config("m"), "bad": tiny_config("bad", "max_batch_size: -3")})
    with ServerThread(repo, auth_tokens=("sesame",), model_control_mode="explicit", load_models=("m",)) as server:
        channel = server.channel()
        err = refusal(lambda: pb_grpc.VideoGenStub(channel).ListModels(pb.ListModelsRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details_of(err)["ErrorInfo"].reason == "UNAUTHENTICATED"
        with VideoGenClient(server.target, token="wrong") as intruder, pytest.raises(UnauthenticatedError) as typed:
            intruder.list_models()
        assert typed.value.error_reason == "UNAUTHENTICATED"

        token = (("authorization", "Bearer sesame"),)
        err = refusal(lambda: pb_grpc.VideoGenStub(channel).LoadModel(pb.LoadModelRequest(name="bad"),
                                                                       metadata=token))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    found = details_of(err)
    assert found["ErrorInfo"].reason == "INVALID_CONFIG" and found["ErrorInfo"].metadata["field"] == "max_batch_size"
    [violation] = found["PreconditionFailure"].violations
    assert violation.type == "CONFIG" and violation.subject.endswith("config.pbtxt: max_batch_size")


def test_the_triton_protocol_carries_them_too(tiny_server):
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(tiny_server.channel())
    err = refusal(lambda: stub.ModelInfer(kpb.ModelInferRequest(model_name="svd-tiny"), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(err)["ErrorInfo"].reason == "INVALID_FIELD"


def test_a_bad_field_is_named_as_the_callers_request_names_it(make_repo):
    """The engine's checks name GenerateRequest's paths (`model`, `output.video_fps`); a caller of
    GetModel/LoadModel/UnloadModel sent `name`, a KServe caller `model_name`, `name` or an input tensor,
    and was told about a field its request does not have (found by a black-box review). UnloadModel
    of "" said NOT_FOUND where LoadModel of "" says `name: required`."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    def field_of(call) -> tuple[grpc.StatusCode, str, str]:
        err = refusal(call)
        found = details_of(err)
        [violation] = found["BadRequest"].field_violations
        assert found["ErrorInfo"].metadata["field"] == violation.field
        assert err.details().startswith(f"{violation.field}: ")
        return err.code(), violation.field

    bad_name = "x" * 300  # past MAX_MODEL_NAME
    with ServerThread(make_repo({"m": tiny_config("m")}), model_control_mode="explicit",
                      load_models=("m",)) as server:
        stub, kserve = pb_grpc.VideoGenStub(server.channel()), kpb_grpc.GRPCInferenceServiceStub(server.channel())
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(lambda: stub.GetModel(pb.GetModelRequest(name=bad_name))) == (invalid, "name")
        assert field_of(lambda: stub.LoadModel(pb.LoadModelRequest(name="a\nb"))) == (invalid, "name")
        assert field_of(lambda: stub.UnloadModel(pb.UnloadModelRequest(name=bad_name))) == (invalid, "name")
        assert field_of(lambda: stub.UnloadModel(pb.UnloadModelRequest(name=""))) == (invalid, "name")
        assert field_of(lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=bad_name))) == (invalid, "name")
        assert field_of(lambda: kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=bad_name))) == \
            (invalid, "name")
        assert field_of(lambda: kserve.RepositoryModelLoad(
            kpb.RepositoryModelLoadRequest(model_name=bad_name))) == (invalid, "model_name")

        def infer(model: str, **inputs: int) -> kpb.ModelInferRequest:
            req = kpb.ModelInferRequest(model_name=model)
            image = req.inputs.add(name="image", datatype="BYTES", shape=[1])
            image.contents.bytes_contents.append(sample_png())
            for name, value in inputs.items():
                req.inputs.add(name=name, datatype="INT32", shape=[1]).contents.int_contents.append(value)
            return req

        assert field_of(lambda: kserve.ModelInfer(infer(bad_name), timeout=30)) == (invalid, "model_name")
        assert field_of(lambda: kserve.ModelInfer(infer("m", video_fps=0), timeout=30)) == (invalid, "video_fps")
        [response] = list(kserve.ModelStreamInfer(iter([infer("m", video_fps=0)]), timeout=30))
        assert response.error_message.startswith("video_fps: ")
        # the Generate call itself names GenerateRequest's own paths, as before
        err = refusal(lambda: collect(stub, request(model="m", output={"video_fps": 0})))
        assert details_of(err)["BadRequest"].field_violations[0].field == "output.video_fps"


def test_frames_one_infer_response_cannot_hold_are_refused_before_the_generation(make_repo):
    """A unary ModelInfer sends every frame in one message, and protobuf serialises none of 2 GiB: a model
    whose limits allow it generated the whole video, then failed to send it (review). Refused at admission,
    naming the output; counted as a refusal, nothing run."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    big = tiny_config("big", parameters=TINY_PARAMETERS + 'parameters { key: "max_num_frames" value { string_value: "800" } }\n')
    with ServerThread(make_repo({"big": big}), model_control_mode="explicit", load_models=("big",)) as server:
        kserve = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        req = kpb.ModelInferRequest(model_name="big")
        req.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(sample_png())
        for name, value in (("num_frames", 700), ("width", 1024), ("height", 1024)):
            req.inputs.add(name=name, datatype="INT32", shape=[1]).contents.int_contents.append(value)
        started = time.monotonic()
        err = refusal(lambda: kserve.ModelInfer(req, timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("frames: 700 frames of 1024x1024 are 2.05 GiB of RGB, more than one response")
        assert time.monotonic() - started < 10  # (700 frames at 1024x1024 take minutes on this CPU)
        assert server.metric("videogen_requests_total", model="big", outcome="rejected", code="INVALID_ARGUMENT") == 1
        assert server.metric("videogen_frames_generated_total", model="big") == 0


def test_a_long_message_is_cut_so_the_status_survives(tiny_server, caplog):
    """Some messages echo a caller's text (an output's name): uncut, the message and its details passed
    gRPC's 8 KiB trailer limit and the caller read RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT; and
    the request log line carried it whole (the security audit's 4 MiB name wrote 25 MB of log)."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    from videogen_server.transport.kserve import serialize_bytes
    from videogen_server.transport.status import MAX_MESSAGE_BYTES

    caplog.set_level("INFO", logger="videogen.requests")
    stub = kpb_grpc.GRPCInferenceServiceStub(tiny_server.channel())
    for name in ("o" * 5000, "\u00e9" * 3000):  # ASCII, and text that percent-encodes to 3 bytes a byte
        request_ = kpb.ModelInferRequest(model_name="svd-tiny")
        request_.inputs.add(name="image", datatype="BYTES", shape=[1])
        request_.raw_input_contents.append(serialize_bytes([sample_png()]))
        request_.outputs.add(name=name)
        for _ in range(5):  # the limit is enforced at random between 8 and 16 KiB
            err = refusal(lambda: stub.ModelInfer(request_, timeout=30))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()[:200]
            assert details_of(err)["ErrorInfo"].reason == "INVALID_FIELD"  # code and message agree
            assert len(err.details().encode()) <= MAX_MESSAGE_BYTES and err.details().endswith("\u2026")
    errors = [r.videogen_request["error"] for r in caplog.records if hasattr(r, "videogen_request")]
    assert len(errors) == 10 and all(len(e.encode()) <= MAX_MESSAGE_BYTES for e in errors)


def test_a_stream_request_that_fails_names_its_code_and_reason(tiny_server):
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(tiny_server.channel())
    [response] = list(stub.ModelStreamInfer(iter([kpb.ModelInferRequest(model_name="svd-tiny", id="q")]),
                                            timeout=30))  # no image
    assert response.error_message.startswith("image")
    parameters = response.infer_response.parameters
    assert (parameters["error_code"].string_param, parameters["error_reason"].string_param) == \
        ("INVALID_ARGUMENT", "INVALID_FIELD")


class _FailedCall(grpc.RpcError):
    """What grpc raises for a failed call, with the trailers a server (or a proxy) might send."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()


def _status_trailer(code: grpc.StatusCode, message: str, *details) -> tuple:
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    packed = []
    for detail in details:
        if isinstance(detail, any_pb2.Any):
            packed.append(detail)
            continue
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_the_sdk_reads_what_it_can_and_never_fails_over_details():
    from google.protobuf import any_pb2

    from videogen_client.errors import from_rpc_error

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    oom_text = "out of device memory for this request"
    # a corrupt detail is left out: the error is still typed, by its message
    corrupt = any_pb2.Any(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=b"\xff\xff\xff")
    err = from_rpc_error(_FailedCall(exhausted, oom_text, _status_trailer(exhausted, oom_text, corrupt)))
    assert isinstance(err, OutOfMemoryError) and err.error_reason is None
    # details without an ErrorInfo: the message decides, as for a server without details
    err = from_rpc_error(_FailedCall(exhausted, oom_text, _status_trailer(exhausted, oom_text)))
    assert isinstance(err, OutOfMemoryError)
    # details whose code is not the call's (a proxy's rewrite) are not believed
    info = error_details_pb2.ErrorInfo(reason="OUT_OF_MEMORY")
    err = from_rpc_error(_FailedCall(exhausted, "queue full", _status_trailer(grpc.StatusCode.INTERNAL, "x", info)))
    assert isinstance(err, QueueFullError) and err.error_reason is None
    # garbage in the trailer
    err = from_rpc_error(_FailedCall(exhausted, "queue full", (("grpc-status-details-bin", b"\xff\x00garbage"),)))
    assert isinstance(err, QueueFullError) and err.status_details == []
    # a retry delay keeps its sub-millisecond part
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromNanoseconds(1_500_500)
    err = from_rpc_error(_FailedCall(exhausted, "queue full", _status_trailer(exhausted, "queue full", retry)))
    assert err.retry_delay == pytest.approx(0.0015005)
