"""OpenTelemetry traces of requests, exported over OTLP/gRPC (`--otlp-endpoint`).

A traced Generate (or KServe ModelInfer) call gives one trace, joined to the caller's own when its
metadata carries a W3C `traceparent` (the SDK sends it when the caller has OpenTelemetry):

    videogen.v1.VideoGen/Generate     SERVER, from the transport (transport/tracing.py): rpc.* and the status
      videogen.generate               the engine's part: request id, model, version, size, seed, outcome...
        preprocess                    image decode and resize, before the request is queued
        queue                         queued until an instance took it (batched with others or alone)
        image_encode, denoise         the instance's phases; denoise has an event per step
        vae_decode                    one per decode chunk (chunk index, frames)
        encode                        one per chunk: its frames (PNG/JPEG) and MP4 fragment
        mp4_finish                    the MP4's last fragment

Phase spans are built from the engine's own timings once a phase has ended (the instance thread
stamps each event as it sends it), so tracing adds nothing to the instance thread's work. Without an
endpoint every call here is a no-op (opentelemetry-api's non-recording spans), yet the caller's trace
id still reaches the request log. Each server owns its tracer provider (never the process-global
one), started in explicit start-up and flushed at stop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Mapping, Optional, Sequence

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .config import ServerConfig

log = logging.getLogger(__name__)

#: W3C Trace Context: the metadata keys a trace travels in.
PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")

#: gRPC codes that mark a server span as failed (OpenTelemetry's semantic conventions for RPC servers:
#: the others, INVALID_ARGUMENT or NOT_FOUND say, are the caller's to handle, not the server's fault).
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS"})

#: The label of the latency histograms' exemplars (Grafana's exemplarTraceIdDestinations name it).
EXEMPLAR_LABEL = "trace_id"
#: In the trace context the transport hands the engine: the trace started here and was not sampled
#: (nothing of it is exported, so the request's log line names no trace)
UNSAMPLED_HERE = "x-videogen-unsampled-here"

#: How long one export may take, and how long the server's stop waits for the last spans to leave.
EXPORT_TIMEOUT_S = 5.0


def trace_id_of(span_context: SpanContext) -> str:
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


class Tracing:
    """The server's tracer: OTLP/gRPC export when `config.otlp_endpoint` is set, else a no-op."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._provider = None
        self._exporter = None
        self.tracer: trace.Tracer = trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def start(self) -> None:
        """Imports the SDK and starts the exporter's thread (spans leave in batches, off the event loop)."""
        endpoint = self._config.otlp_endpoint
        if not endpoint or self._provider is not None:
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name and the like, from the Downward API)
        resource = Resource.create({"service.name": self._config.otlp_service_name, "service.version": __version__})
        # a caller's sampling decision is kept; a trace that starts here is sampled at the configured ratio
        provider = TracerProvider(resource=resource,
                                  sampler=ParentBased(TraceIdRatioBased(self._config.trace_sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"),
                                    timeout=EXPORT_TIMEOUT_S)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider, self._exporter = provider, exporter
        self.tracer = provider.get_tracer("videogen", __version__)
        log.info("tracing: OTLP/gRPC to %s, sampling %g of the traces that start here",
                 endpoint, self._config.trace_sample_ratio)

    def shutdown(self) -> None:
        """Sends the spans not yet exported and stops the exporter, waiting at most EXPORT_TIMEOUT_S (+1 s
        to end it). Blocking: run it off the event loop.

        The SDK's own flush is not bounded by its timeout (it sends every queued batch, each with the
        exporter's timeout: ~20 s for a full queue and a collector that does not answer), so it runs on a
        daemon thread the stop waits for only so long; the exporter is then shut down, which cuts its
        retries short, and what was not sent is dropped with the process."""
        provider, exporter = self._provider, self._exporter
        self._provider = self._exporter = None
        self.tracer = trace.NoOpTracer()
        if provider is None:
            return
        flush = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
        flush.start()
        flush.join(EXPORT_TIMEOUT_S)
        if flush.is_alive():
            log.warning("tracing: the collector took more than %.0f s; spans not yet sent are dropped",
                        EXPORT_TIMEOUT_S)
            exporter.shutdown()
            flush.join(1.0)

    def request(self, carrier: Sequence[tuple[str, str]]) -> "RequestTrace":
        return RequestTrace(self.tracer, carrier)

    def record_load(self, model: str, version: int, backend: str, started: float, instances: Sequence,
                    error: Optional[BaseException] = None) -> None:
        """A trace of one model version's load (a root, sampled at the ratio), built once it has ended:
        `videogen.load_model`, then per instance `initialize` (weights, compile set-up) and one
        `warmup_batch` per warm-up batch (where torch.compile builds its graphs). `instances` carry their
        `load_phases` (time.monotonic())."""
        if not self.enabled:
            return
        spans = RequestTrace(self.tracer, (), name="videogen.load_model", start=started)
        for instance in instances:
            for phase, start, end, attributes in instance.load_phases:
                spans.phase(phase, start, end, {"instance": instance.name, "device": instance.device, **attributes})
        code, outcome, message = "OK", "loaded", ""
        if isinstance(error, asyncio.CancelledError):
            code, outcome = "CANCELLED", "cancelled"
        elif error is not None:
            code, outcome, message = "UNAVAILABLE", "failed", "the load failed: the server log has why"
        spans.end({"model": model, "version": version, "backend": backend, "instances": len(instances),
                   "outcome": outcome}, code, message)


def _caller_span(carrier: Sequence[tuple[str, str]]) -> SpanContext:
    """The caller's span in the context the transport gives the engine (`trace_context_of`), for a log
    line to name: invalid when there is none, or when the trace started here unsampled (nothing of it is
    exported: its id is nobody's)."""
    if not carrier or any(key == UNSAMPLED_HERE for key, _ in carrier):
        return INVALID_SPAN_CONTEXT
    return trace.get_current_span(PROPAGATOR.extract(dict(carrier))).get_span_context()


def logged_trace_id(carrier: Sequence[tuple[str, str]]) -> str:
    """The trace a request refused before the engine names in its log line (RequestTrace.trace_id's
    rule, without a span of its own): the caller's, or ""."""
    return trace_id_of(_caller_span(carrier))


class RequestTrace:
    """The spans of one request in the engine (or of a model load); times are `time.monotonic()` seconds."""

    def __init__(self, tracer: trace.Tracer, carrier: Sequence[tuple[str, str]], *,
                 name: str = "videogen.generate", start: Optional[float] = None) -> None:
        parent = PROPAGATOR.extract(dict(carrier)) if carrier else None
        self._parent = _caller_span(carrier)
        self._tracer = tracer
        self._offset_ns = time.time_ns() - time.monotonic_ns()  # one clock per request: its spans line up
        self.span = tracer.start_span(name, context=parent, kind=SpanKind.INTERNAL,
                                      start_time=None if start is None else self._ns(start))
        self.recording = self.span.is_recording()
        self._context = trace.set_span_in_context(self.span) if self.recording else None

    @property
    def trace_id(self) -> str:
        """The trace to name in the request's log line: this server's when it exports the request's
        spans, else the caller's (its own spans are somewhere); "" if neither."""
        return trace_id_of(self.span.get_span_context()) if self.recording else trace_id_of(self._parent)

    @property
    def exemplar(self) -> Optional[dict[str, str]]:
        """A Prometheus exemplar for this request's latency observations: its trace, when this server
        exports it (sampled), so a dashboard's slow bucket leads to a trace that has the server's spans."""
        if not self.recording:
            return None
        return {EXEMPLAR_LABEL: trace_id_of(self.span.get_span_context())}

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns

    def phase(self, name: str, start: float, end: float, attributes: Optional[Mapping[str, object]] = None) -> None:
        if not self.recording:
            return
        span = self._tracer.start_span(name, context=self._context, start_time=self._ns(start),
                                       attributes=_attributes(attributes or {}))
        span.end(end_time=self._ns(end))

    def event(self, name: str, at: float, attributes: Optional[Mapping[str, object]] = None) -> None:
        if self.recording:
            self.span.add_event(name, _attributes(attributes or {}), timestamp=self._ns(at))

    def end(self, record: Mapping[str, object], code: str, message: str = "") -> None:
        """Ends the request's span with its log record's fields as `videogen.*` attributes."""
        if not self.recording:
            return
        self.span.set_attributes(_attributes({f"videogen.{k}": v for k, v in record.items() if k != "trace_id"}))
        if code in SERVER_ERROR_CODES:
            self.span.set_status(Status(StatusCode.ERROR, message or code))
        self.span.end()


def _attributes(values: Mapping[str, object]) -> dict[str, object]:
    """Span attributes take str, bool, int and float only: others as text, None left out."""
    return {k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in values.items() if v is not None}
