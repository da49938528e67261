"""A real OTLP/gRPC trace endpoint for tests: OTLP's own TraceService (opentelemetry-proto's generated
stubs) on port 0, which the server's exporter talks to as to an OpenTelemetry Collector, Jaeger or Tempo."""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


def attrs(item) -> dict:
    return {kv.key: _value(kv.value) for kv in item.attributes}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict] = []
        self.exports = 0
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        with self._changed:
            self.exports += 1
            for resource_spans in request.resource_spans:
                resource = attrs(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(span)
                        self.resources.append(resource)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait(self, what: str, found: Callable[[list[trace_pb2.Span]], bool], timeout: float = 30) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: found(list(self.spans)), timeout):
                raise AssertionError(f"the collector never received {what}: {[s.name for s in self.spans]}")

    def trace(self, trace_id: bytes) -> list[trace_pb2.Span]:
        with self._changed:
            return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        self._server.stop(None)
