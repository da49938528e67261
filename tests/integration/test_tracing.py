"""OpenTelemetry traces, exported over real OTLP/gRPC to a real collector endpoint.

The collector here is OTLP's own TraceService (opentelemetry-proto's generated stubs) on port 0: the
server's exporter speaks the same wire protocol to it as to an OpenTelemetry Collector, Jaeger or
Tempo. The caller is the Python SDK inside a span of the test's own tracer provider, as a service
that uses OpenTelemetry would call it.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from videogen_client import VideoGenClient
from videogen_client.errors import InvalidArgumentError, ModelNotFoundError, UnauthenticatedError, UnavailableError

from ..helpers import ServerThread, sample_png, tiny_config
from ..otlp import Collector, attrs

SERVER = trace_pb2.Span.SPAN_KIND_SERVER


@pytest.fixture
def collector(monkeypatch) -> Collector:
    # The batch processor sends every 5 s by default; the standard variable makes the test quick.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    c = Collector()
    yield c
    c.stop()


@pytest.fixture
def caller() -> trace.Tracer:
    """The calling service's own tracer (not the process-global one: the server has its own too)."""
    return TracerProvider().get_tracer("caller")


def _in_span(tracer: trace.Tracer, name: str):
    """Runs the with-block with a span of the caller current, as instrumented code does."""
    class _Scope:
        def __enter__(self):
            self.span = tracer.start_span(name)
            self._token = otel_context.attach(trace.set_span_in_context(self.span))
            return self.span

        def __exit__(self, *exc):
            otel_context.detach(self._token)
            self.span.end()

    return _Scope()


def scrape_openmetrics(server: ServerThread) -> str:
    """/metrics as Prometheus asks for it with exemplar storage on (exemplars exist in OpenMetrics only)."""
    scrape = urllib.request.Request(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                    headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(scrape, timeout=10) as response:
        return response.read().decode()


def one(spans: list[trace_pb2.Span], name: str) -> trace_pb2.Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def within(child: trace_pb2.Span, parent: trace_pb2.Span, slack_ns: int = 20_000_000) -> bool:
    return (parent.start_time_unix_nano - slack_ns <= child.start_time_unix_nano <= child.end_time_unix_nano
            <= parent.end_time_unix_nano + slack_ns)


def test_a_generation_is_one_trace_joined_to_the_callers(make_repo, collector, caller, caplog, monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=videogen-0")  # as deploy/k8s sets it
    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint, otlp_service_name="videogen-test") as server, \
            VideoGenClient(server.target) as client, \
            caplog.at_level(logging.INFO, logger="videogen.requests"):
        with _in_span(caller, "caller") as parent:
            result = client.run(sample_png(), model="m", width=64, height=64, num_frames=4,
                                num_inference_steps=3, decode_chunk_size=2, seed=7, request_id="traced-1")
        trace_id = parent.get_span_context().trace_id.to_bytes(16, "big")
        names = {"videogen.v1.VideoGen/Generate", "videogen.generate", "mp4_finish"}
        collector.wait("the generation's spans", lambda spans: names <= {s.name for s in spans if s.trace_id == trace_id})
        spans = collector.trace(trace_id)
        openmetrics = scrape_openmetrics(server)

    rpc = one(spans, "videogen.v1.VideoGen/Generate")
    assert rpc.kind == SERVER
    assert rpc.parent_span_id == parent.get_span_context().span_id.to_bytes(8, "big")  # the caller's span
    assert attrs(rpc) == {"rpc.system": "grpc", "rpc.service": "videogen.v1.VideoGen", "rpc.method": "Generate",
                          "rpc.grpc.status_code": 0}
    assert rpc.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    gen = one(spans, "videogen.generate")
    assert gen.parent_span_id == rpc.span_id and within(gen, rpc)
    a = attrs(gen)
    assert a["videogen.request_id"] == "traced-1" == result.request_id
    assert (a["videogen.model"], a["videogen.version"], a["videogen.seed"]) == ("m", 1, 7)
    assert (a["videogen.width"], a["videogen.frames"], a["videogen.steps"]) == (64, 4, 3)
    assert (a["videogen.outcome"], a["videogen.code"], a["videogen.batch_size"]) == ("success", "OK", 1)
    assert a["videogen.first_frame_s"] > 0 and a["videogen.peak_memory_bytes"] > 0
    assert [e.name for e in gen.events].count("step") == 3
    assert [attrs(e)["step"] for e in gen.events if e.name == "step"] == [1, 2, 3]
    first_frame = [e for e in gen.events if e.name == "first_frame"]
    assert len(first_frame) == 1

    children = [s for s in spans if s.parent_span_id == gen.span_id]
    assert sorted(s.name for s in children) == sorted(
        ["preprocess", "queue", "image_encode", "denoise", "vae_decode", "vae_decode", "encode", "encode",
         "mp4_finish"])
    for span in children:
        assert within(span, gen), span.name
    by = {s.name: s for s in children}
    decodes = sorted((s for s in children if s.name == "vae_decode"), key=lambda s: attrs(s)["chunk_index"])
    assert [attrs(s) for s in decodes] == [{"chunk_index": 0, "frames": 2}, {"chunk_index": 1, "frames": 2}]
    # the phases in the order they ran (a few ms of slack: the spans come from two clocks' readings)
    slack = 5_000_000
    order = [by["preprocess"], by["queue"], by["image_encode"], by["denoise"], *decodes, by["mp4_finish"]]
    for before, after in zip(order, order[1:]):
        assert before.end_time_unix_nano <= after.start_time_unix_nano + slack, (before.name, after.name)
    assert attrs(by["queue"]) == {"started": True}
    # the first frame went out after the first chunk was decoded (and its frames encoded)
    first_encode = min((s for s in children if s.name == "encode"), key=lambda s: s.start_time_unix_nano)
    assert decodes[0].end_time_unix_nano - slack <= first_frame[0].time_unix_nano
    assert first_encode.start_time_unix_nano - slack <= first_frame[0].time_unix_nano
    resource = collector.resources[0]
    assert (resource["service.name"], resource["k8s.pod.name"]) == ("videogen-test", "videogen-0")

    # the latency histograms' exemplars name the trace (OpenMetrics, as Prometheus scrapes with exemplar
    # storage on): a slow bucket on a dashboard leads to this trace
    hex_id = trace.format_trace_id(parent.get_span_context().trace_id)
    for histogram in ("videogen_request_duration_seconds", "videogen_time_to_first_frame_seconds",
                      "videogen_queue_wait_seconds"):
        lines = [line for line in openmetrics.splitlines()
                 if line.startswith(histogram + "_bucket{") and 'model="m"' in line and " # {" in line]
        assert len(lines) == 1 and f'trace_id="{hex_id}"' in lines[0], (histogram, lines)

    # the request log names the trace, so a log line leads to its trace and back
    records = [r.videogen_request for r in caplog.records if getattr(r, "videogen_request", {}).get("request_id") == "traced-1"]
    assert records and records[0]["trace_id"] == trace.format_trace_id(parent.get_span_context().trace_id)


def test_refusals_and_errors_are_spans_with_their_codes_but_not_a_caller_without_a_token(make_repo, collector, caller):
    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint, auth_tokens=("sesame",)) as server:
        with VideoGenClient(server.target, token="sesame") as client:
            with _in_span(caller, "bad input") as bad:
                with pytest.raises(InvalidArgumentError):
                    client.run(sample_png(), model="m", num_frames=-1)
            with _in_span(caller, "unknown model") as unknown:
                with pytest.raises(ModelNotFoundError):
                    client.run(sample_png(), model="nope")
            with _in_span(caller, "list") as listed:
                client.list_models()
        # a caller without a valid token cannot make the server record and export spans, even asking
        # for it (its traceparent says sampled): it could otherwise flood the exporter's queue
        with VideoGenClient(server.target, token="wrong") as intruder, _in_span(caller, "no token") as refused:
            with pytest.raises(UnauthenticatedError):
                intruder.list_models()
        # probes are not traced: they would bury the requests
        health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest())

        expected = {bad: ("videogen.v1.VideoGen/Generate", 3), unknown: ("videogen.v1.VideoGen/Generate", 5),
                    listed: ("videogen.v1.VideoGen/ListModels", 0)}
        ids = {span.get_span_context().trace_id.to_bytes(16, "big"): want for span, want in expected.items()}
        collector.wait("a span per call", lambda spans: set(ids) <= {s.trace_id for s in spans if s.kind == SERVER})
        time.sleep(0.3)  # what else the server would export (a health check's span) has left by now
        spans = list(collector.spans)

    for trace_id, (name, code) in ids.items():
        rpc = one([s for s in spans if s.trace_id == trace_id and s.kind == SERVER], name)
        assert attrs(rpc)["rpc.grpc.status_code"] == code, name
        # the caller's mistakes are not the server's failures (OpenTelemetry's rule for RPC servers)
        assert rpc.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    # a refused generation still has the engine's span, with the field it refused
    bad_id = bad.get_span_context().trace_id.to_bytes(16, "big")
    gen = one([s for s in spans if s.trace_id == bad_id], "videogen.generate")
    assert attrs(gen)["videogen.code"] == "INVALID_ARGUMENT" and "num_frames" in attrs(gen)["videogen.error"]
    assert not [s for s in spans if "Health" in s.name]
    assert not [s for s in spans if s.trace_id == refused.get_span_context().trace_id.to_bytes(16, "big")]


def test_a_call_refused_before_the_engine_names_its_trace_in_the_log(make_repo, collector, caller, caplog):
    """A call the transport refuses (an empty model name; the concurrency limit) is exported as its RPC's
    span, and its log line named no trace: the two could not be matched (observability review)."""
    import grpc
    from opentelemetry.propagate import inject
    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    from ..helpers import request

    with ServerThread(make_repo({"m": tiny_config("m")}), otlp_endpoint=collector.endpoint) as server, \
            caplog.at_level(logging.INFO, logger="videogen.requests"):
        stub = pb_grpc.VideoGenStub(server.channel())
        with _in_span(caller, "empty model") as span:
            carrier: dict[str, str] = {}
            inject(carrier)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request(model=""), metadata=(*carrier.items(), ("x-request-id", "no-model")),
                                   timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trace_id = span.get_span_context().trace_id.to_bytes(16, "big")
        collector.wait("the refused call's span", lambda spans: any(s.trace_id == trace_id for s in spans))
    [line] = [r.videogen_request for r in caplog.records
              if getattr(r, "videogen_request", {}).get("request_id") == "no-model"]
    assert line["trace_id"] == trace_id.hex(), line


def test_a_cancelled_generation_and_a_server_failure(make_repo, collector, caller):
    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint) as server, VideoGenClient(server.target) as client:
        with _in_span(caller, "cancel") as cancelled:
            events = client.generate(sample_png(), model="m", width=64, height=64, num_frames=4,
                                     num_inference_steps=40)
            for event in events:
                if type(event).__name__ == "Progress":
                    break
            events.close()  # the caller goes away mid-denoising
        trace_id = cancelled.get_span_context().trace_id.to_bytes(16, "big")
        collector.wait("the cancelled call's spans",
                       lambda spans: {"videogen.generate", "videogen.v1.VideoGen/Generate"}
                       <= {s.name for s in spans if s.trace_id == trace_id})
        spans = collector.trace(trace_id)
        rpc = one(spans, "videogen.v1.VideoGen/Generate")
        assert attrs(rpc)["rpc.grpc.status_code"] == 1  # CANCELLED
        gen = one(spans, "videogen.generate")
        assert (attrs(gen)["videogen.outcome"], attrs(gen)["videogen.code"]) == ("cancelled", "CANCELLED")
        assert attrs(one(spans, "queue"))["started"] is True

        # a server-side failure is an error span: the model unloaded under a running request
        server.run(server.engine.unload_model("m"))
        with _in_span(caller, "unavailable") as unavailable:
            with pytest.raises(UnavailableError):
                client.run(sample_png(), model="m")
        uid = unavailable.get_span_context().trace_id.to_bytes(16, "big")
        attempts = client.retry.max_attempts  # the SDK sends a refused call again: one span per attempt
        collector.wait("the refused call's spans", lambda spans: sum(
            s.trace_id == uid and s.kind == SERVER for s in spans) == attempts)
        for rpc in [s for s in collector.trace(uid) if s.kind == SERVER]:
            assert attrs(rpc)["rpc.grpc.status_code"] == 14  # UNAVAILABLE
            assert rpc.status.code == trace_pb2.Status.STATUS_CODE_ERROR and "not ready" in rpc.status.message


def test_the_asyncio_client_joins_the_callers_trace_and_a_passed_deadline_is_named(make_repo, collector, caller):
    import asyncio

    from videogen_client import AsyncVideoGenClient
    from videogen_client.errors import DeadlineExceededError

    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint) as server:
        async def call() -> tuple[trace.Span, trace.Span]:
            async with AsyncVideoGenClient(server.target) as client:
                with _in_span(caller, "aio") as ok:
                    await client.run(sample_png(), model="m", width=64, height=64, num_frames=2,
                                     num_inference_steps=1)
                with _in_span(caller, "late") as late:
                    with pytest.raises(DeadlineExceededError):
                        await client.run(sample_png(), model="m", width=64, height=64, num_frames=4,
                                         num_inference_steps=50, timeout=0.5)
            return ok, late

        ok, late = asyncio.run(call())
        want = {span.get_span_context().trace_id.to_bytes(16, "big"): (span, code)
                for span, code in ((ok, 0), (late, 4))}
        collector.wait("both calls' spans", lambda spans: set(want) <= {s.trace_id for s in spans if s.kind == SERVER})
        for trace_id, (parent, code) in want.items():
            rpc = one([s for s in collector.trace(trace_id) if s.kind == SERVER], "videogen.v1.VideoGen/Generate")
            assert rpc.parent_span_id == parent.get_span_context().span_id.to_bytes(8, "big")
            assert attrs(rpc)["rpc.grpc.status_code"] == code


def test_a_kserve_inference_is_traced_the_same_way(make_repo, collector, caller):
    """Triton's protocol (ModelInfer) gives the same trace: its RPC span, then the engine's."""
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint) as server:
        req = _infer_request("kserve-1")
        with _in_span(caller, "triton client") as parent:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)  # what an instrumented gRPC client sends
            kpb_grpc.GRPCInferenceServiceStub(server.channel()).ModelInfer(req, metadata=tuple(carrier.items()),
                                                                            timeout=60)
        trace_id = parent.get_span_context().trace_id.to_bytes(16, "big")
        collector.wait("the inference's spans", lambda spans: {"inference.GRPCInferenceService/ModelInfer",
                                                                "videogen.generate"}
                       <= {s.name for s in spans if s.trace_id == trace_id})
        spans = collector.trace(trace_id)
    rpc = one(spans, "inference.GRPCInferenceService/ModelInfer")
    assert rpc.parent_span_id == parent.get_span_context().span_id.to_bytes(8, "big")
    assert attrs(rpc)["rpc.grpc.status_code"] == 0
    gen = one(spans, "videogen.generate")
    assert gen.parent_span_id == rpc.span_id and attrs(gen)["videogen.request_id"] == "kserve-1"
    assert {"denoise", "vae_decode"} <= {s.name for s in spans if s.parent_span_id == gen.span_id}


def test_sampling_follows_the_caller_and_the_ratio(make_repo, collector, caller, caplog):
    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint, trace_sample_ratio=0.0) as server, \
            VideoGenClient(server.target) as client, caplog.at_level(logging.INFO, logger="videogen.requests"):
        client.list_models()  # no caller trace: starts here, sampled at 0
        # nor its generation; and its log line names no trace (the unsampled trace's id led nowhere: review)
        client.run(sample_png(), model="m", width=64, height=64, num_frames=1, num_inference_steps=1,
                   request_id="not-sampled-here")
        with _in_span(caller, "sampled") as sampled:
            client.list_models()  # the caller sampled it: kept
        tid = sampled.get_span_context().trace_id.to_bytes(16, "big")
        collector.wait("the caller-sampled span", lambda spans: any(s.trace_id == tid for s in spans))
        time.sleep(0.3)
        assert [s.trace_id for s in collector.spans] == [tid]
    [line] = [r.videogen_request for r in caplog.records
              if getattr(r, "videogen_request", {}).get("request_id") == "not-sampled-here"]
    assert "trace_id" not in line, line


def test_a_caller_that_does_not_sample_is_not_traced_here_but_its_log_line_names_its_trace(
        make_repo, collector, caplog):
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("caller")
    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint) as server, VideoGenClient(server.target) as client, \
            caplog.at_level(logging.INFO, logger="videogen.requests"):
        with _in_span(unsampled, "not sampled") as parent:  # traceparent ...-00
            client.run(sample_png(), model="m", width=64, height=64, num_frames=2, num_inference_steps=1,
                       request_id="unsampled")
        client.run(sample_png(), model="m", width=64, height=64, num_frames=2, num_inference_steps=1,
                   request_id="root")  # starts a trace here: sampled (ratio 1)
        collector.wait("the root request's spans", lambda spans: any(s.name == "videogen.generate" for s in spans))
        time.sleep(0.3)
        spans = list(collector.spans)
    caller_id = parent.get_span_context().trace_id.to_bytes(16, "big")
    assert not [s for s in spans if s.trace_id == caller_id]
    log = {r.videogen_request["request_id"]: r.videogen_request for r in caplog.records
           if getattr(r, "videogen_request", None)}
    assert log["unsampled"]["trace_id"] == caller_id.hex()  # the caller's trace, where its own spans are
    root = one(spans, "videogen.generate")
    assert log["root"]["trace_id"] == root.trace_id.hex()  # an exported trace only


def test_each_request_of_a_kserve_stream_is_traced_on_its_own(make_repo, collector, caller):
    """A stream may stay open for hours: its requests' spans hang from the caller's span (not from the
    stream's, which ends with it) and are exported as each request ends."""
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    repo = make_repo({"m": tiny_config("m")})
    with ServerThread(repo, otlp_endpoint=collector.endpoint) as server:
        stub = kpb_grpc.GRPCInferenceServiceStub(server.channel())
        with _in_span(caller, "triton stream") as parent:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
        release = threading.Event()

        def requests():
            yield _infer_request("first")
            release.wait(60)  # the stream stays open until the first request's spans have been exported
            yield _infer_request("second")

        responses = stub.ModelStreamInfer(requests(), metadata=tuple(carrier.items()), timeout=120)
        trace_id = parent.get_span_context().trace_id.to_bytes(16, "big")
        try:
            collector.wait("the first request's spans while its stream is open", lambda spans: any(
                s.name == "videogen.generate" and s.trace_id == trace_id for s in spans))
        finally:
            release.set()
        list(responses)
        collector.wait("the stream's span", lambda spans: any(
            s.name == "inference.GRPCInferenceService/ModelStreamInfer" for s in spans))
        spans = collector.trace(trace_id)
    parent_id = parent.get_span_context().span_id.to_bytes(8, "big")
    generations = [s for s in spans if s.name == "videogen.generate"]
    assert sorted(attrs(s)["videogen.request_id"] for s in generations) == ["first", "second"]
    assert all(s.parent_span_id == parent_id for s in generations)
    assert one(spans, "inference.GRPCInferenceService/ModelStreamInfer").parent_span_id == parent_id


def test_without_an_endpoint_the_log_still_names_the_callers_trace(tiny_server, caller, caplog):
    assert not tiny_server.engine.tracing.enabled
    with VideoGenClient(tiny_server.target) as client, caplog.at_level(logging.INFO, logger="videogen.requests"):
        with _in_span(caller, "caller") as parent:
            client.run(sample_png(), model="svd-tiny", width=64, height=64, num_frames=2, num_inference_steps=1,
                       request_id="untraced")
    records = [r.videogen_request for r in caplog.records if getattr(r, "videogen_request", {}).get("request_id") == "untraced"]
    assert records[0]["trace_id"] == trace.format_trace_id(parent.get_span_context().trace_id)
    # no exemplars: they would name traces that hold none of this server's spans
    assert "trace_id" not in scrape_openmetrics(tiny_server)


def test_stop_flushes_the_last_spans_and_an_unreachable_collector_does_not_hold_it(make_repo, collector, caller,
                                                                                     monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing leaves on its own within the test
    repo = make_repo({"m": tiny_config("m")})
    server = ServerThread(repo, otlp_endpoint=collector.endpoint).start()
    try:
        with VideoGenClient(server.target) as client, _in_span(caller, "last") as last:
            client.list_models()
        time.sleep(0.2)
        assert collector.exports == 0
    finally:
        server.stop()
    tid = last.get_span_context().trace_id.to_bytes(16, "big")
    assert [s.name for s in collector.trace(tid)] == ["videogen.v1.VideoGen/ListModels"]

    # a collector that accepts connections and never answers, and more spans queued than one export
    # takes (the SDK's flush would send every batch, each waiting out the exporter's timeout): the stop
    # gives up after EXPORT_TIMEOUT_S
    from videogen_server.tracing import EXPORT_TIMEOUT_S

    hung = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.extend(iter(lambda: hung.accept()[0], None)), daemon=True).start()
    server = ServerThread(repo, otlp_endpoint=f"http://127.0.0.1:{hung.getsockname()[1]}").start()
    try:
        tracer = server.engine.tracing.tracer
        for i in range(1500):  # three batches of 512
            tracer.start_span(f"queued {i}").end()
    finally:
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        hung.close()
    # the SDK's own flush would wait out three exports (>= 3 x EXPORT_TIMEOUT_S); the room above one is
    # for the rest of the stop and a pause of this process's garbage collector (tests/gc_pauses.py)
    assert took < 2 * EXPORT_TIMEOUT_S, took


def test_bad_tracing_settings_are_refused():
    from videogen_server.config import ServerConfig

    with pytest.raises(ValueError, match="--otlp-endpoint: 'collector:4317' needs a scheme"):
        ServerConfig(model_repositories=(), otlp_endpoint="collector:4317")
    with pytest.raises(ValueError, match="has a path: traces go over OTLP/gRPC"):
        ServerConfig(model_repositories=(), otlp_endpoint="http://collector:4318/v1/traces")
    with pytest.raises(ValueError, match="--trace-sample-ratio: 1.5 is outside 0..1"):
        ServerConfig(model_repositories=(), trace_sample_ratio=1.5)


def _infer_request(request_id: str):
    import struct

    from inference import grpc_service_pb2 as kpb

    from videogen_server.transport.kserve import serialize_bytes

    req = kpb.ModelInferRequest(model_name="m", id=request_id)
    req.inputs.add(name="image", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(serialize_bytes([sample_png()]))
    for name, values in (("size", [64, 64]), ("num_frames", [2]), ("num_inference_steps", [1])):
        req.inputs.add(name=name, datatype="INT32", shape=[len(values)])
        req.raw_input_contents.append(struct.pack(f"<{len(values)}i", *values))
    return req


class _RaisingPropagator:
    fields = {"x-raises"}

    def inject(self, carrier, context=None, setter=None):
        raise RuntimeError("a propagator bug")

    def extract(self, carrier, context=None, getter=None):
        return context


class _BadKeyPropagator(_RaisingPropagator):
    def inject(self, carrier, context=None, setter=None):
        carrier["Bad Key"] = "1"  # gRPC would refuse the call over this key ("Invalid metadata")
        carrier["x-bin-ok"] = "\x00binary"  # or over this value


def test_a_callers_broken_opentelemetry_never_fails_a_call(tiny_server, caller, caplog):
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    import videogen_client._request as sdk

    before = propagate.get_global_textmap()
    try:
        with VideoGenClient(tiny_server.target) as client, caplog.at_level(logging.INFO, logger="videogen.requests"):
            propagate.set_global_textmap(_RaisingPropagator())
            with _in_span(caller, "raising"):
                assert client.list_models()
            # keys and values gRPC would refuse are left out; the W3C context beside them still goes
            propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), _BadKeyPropagator()]))
            with _in_span(caller, "bad key") as parent:
                client.run(sample_png(), width=64, height=64, num_frames=2, num_inference_steps=1,
                           model="svd-tiny", request_id="bad-key")
        record = next(r.videogen_request for r in caplog.records
                      if getattr(r, "videogen_request", {}).get("request_id") == "bad-key")
        assert record["trace_id"] == trace.format_trace_id(parent.get_span_context().trace_id)
    finally:
        propagate.set_global_textmap(before)
        sdk._INJECT_FAILED = False

    # OTEL_PROPAGATORS naming a propagator that is not installed makes opentelemetry.propagate's import
    # raise: calls still work, and say why once
    code = ("import logging, sys; logging.basicConfig(); from opentelemetry import trace; "
            "from opentelemetry.sdk.trace import TracerProvider; from videogen_client import VideoGenClient; "
            "span = TracerProvider().get_tracer('t').start_span('s'); "
            "c = VideoGenClient(sys.argv[1]);\n"
            "with trace.use_span(span):\n"
            "    print(len(c.list_models()), len(c.list_models()))")
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code, tiny_server.target], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OTEL_PROPAGATORS="b3"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
    assert done.stderr.count("OpenTelemetry cannot be used") == 1, done.stderr


def test_a_start_that_fails_leaves_no_exporter_running(make_repo, collector):
    repo = make_repo({"m": tiny_config("m")})
    taken = socket.create_server(("127.0.0.1", 0))
    server = ServerThread(repo, otlp_endpoint=collector.endpoint, port=taken.getsockname()[1])
    try:
        with pytest.raises(OSError, match="cannot bind the gRPC port"):
            server.start()
        assert not server.server.engine.tracing.enabled
        assert not [t.name for t in threading.enumerate() if t.name.startswith("OtelBatchSpan")]
    finally:
        server.server = None  # never started: nothing to stop but its loop
        server.stop()
        taken.close()


def test_a_model_load_is_a_trace_of_its_own(make_repo, collector):
    """Where a (cold) start's minutes go: each instance's initialize and every warm-up batch (where
    torch.compile builds its graphs), and why a version failed."""
    from ..helpers import TINY_PARAMETERS

    warm = ('model_warmup [ { name: "w" count: 2 inputs { key: "num_inference_steps" value: "1" } '
            'inputs { key: "num_frames" value: "2" } } ]')
    failing = TINY_PARAMETERS + 'parameters { key: "fault_injection" value { string_value: "error@1:seed=5" } }'
    bad_warm = 'model_warmup [ { name: "b" inputs { key: "seed" value: "5" } inputs { key: "num_frames" value: "2" } } ]'
    repo = make_repo({"m": tiny_config("m", warm), "bad": tiny_config("bad", bad_warm, parameters=failing)})
    with ServerThread(repo, otlp_endpoint=collector.endpoint):
        collector.wait("both loads' traces", lambda spans: sum(s.name == "videogen.load_model" for s in spans) == 2)
        time.sleep(0.3)
        spans = list(collector.spans)
    loads = {attrs(s)["videogen.model"]: s for s in spans if s.name == "videogen.load_model"}
    ok, bad = loads["m"], loads["bad"]
    assert not ok.parent_span_id and attrs(ok)["videogen.outcome"] == "loaded"
    assert (attrs(ok)["videogen.version"], attrs(ok)["videogen.instances"]) == (1, 1)
    children = sorted((s for s in spans if s.parent_span_id == ok.span_id), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in children] == ["initialize", "warmup_batch", "warmup_batch"]
    assert [attrs(s).get("request_id") for s in children[1:]] == ["warmup-w-0-0", "warmup-w-1-0"]
    assert all(attrs(s)["instance"] == "0" and attrs(s)["device"] == "cpu" for s in children)
    for before, after in zip(children, children[1:]):
        assert before.end_time_unix_nano <= after.start_time_unix_nano
    assert within(children[0], ok) and within(children[-1], ok)
    assert ok.status.code == trace_pb2.Status.STATUS_CODE_UNSET

    assert attrs(bad)["videogen.outcome"] == "failed" and bad.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert [s.name for s in spans if s.parent_span_id == bad.span_id] == ["initialize", "warmup_batch"]
