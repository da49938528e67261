"""The RPC's span (OpenTelemetry's server span for gRPC) and the trace context handed to the engine.

`TracingInterceptor` (installed when tracing is on, after authentication: a caller without a token
cannot make the server record and export spans, whatever its traceparent asks) opens a SERVER span
per call, parented on the caller's W3C `traceparent` metadata, and ends it with the call's status
code. Health checks (grpc.health and KServe's liveness/readiness RPCs) and reflection are left out:
probes every few seconds would bury the requests. `trace_context_of` gives the engine the context its
spans hang from.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from typing import Awaitable, Callable, Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..tracing import PROPAGATOR, SERVER_ERROR_CODES, TRACE_HEADERS, UNSAMPLED_HERE

UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/inference.GRPCInferenceService/ServerLive",
                     "/inference.GRPCInferenceService/ServerReady", "/inference.GRPCInferenceService/ModelReady")


def _text(value) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")


def _incoming(metadata) -> tuple[tuple[str, str], ...]:
    return tuple((key, _text(value)) for key, value in metadata or () if key in TRACE_HEADERS)


def trace_context_of(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The trace context for the engine: this call's span when one is open (tracing on) and recorded;
    else the caller's own traceparent/tracestate as received; else (a trace this server started and did
    not sample) this call's span, marked so, that the engine's follow it unsampled and the request's log
    line names no trace: its id led nowhere (observability review)."""
    span = trace.get_current_span()
    if span.get_span_context().is_valid:
        incoming = () if span.is_recording() else incoming_trace_context(context)
        if incoming:
            return incoming
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        return tuple(carrier.items()) + (() if span.is_recording() else ((UNSAMPLED_HERE, "1"),))
    return incoming_trace_context(context)


def incoming_trace_context(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The caller's traceparent/tracestate as received. For the requests of a stream (KServe's
    ModelStreamInfer), whose span lasts as long as the stream (hours, for a client that keeps one
    open): each request's spans hang from the caller's span directly (or start a trace of their own,
    sampled at the ratio), and are exported when the request ends, not when the stream does."""
    return _incoming(context.invocation_metadata())


class TracingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNTRACED_PREFIXES):
            return handler
        behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                     or handler.stream_stream)
        streams = bool(handler.unary_stream or handler.stream_stream)
        if not (inspect.isasyncgenfunction(behaviour) if streams else inspect.iscoroutinefunction(behaviour)):
            return handler  # a synchronous handler, or a stream written with context.write: not wrapped
        name = details.method.lstrip("/")
        service, _, method = name.rpartition("/")
        carrier = dict(_incoming(details.invocation_metadata))
        tracer = self._tracer

        @contextlib.contextmanager
        def call_span(context: grpc.aio.ServicerContext) -> Iterator[None]:
            span = tracer.start_span(name, context=PROPAGATOR.extract(carrier) if carrier else None,
                                     kind=SpanKind.SERVER,
                                     attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
            # The span is the call's current one from here: the handler (and the engine's spans through
            # trace_context_of) read it. Each call runs in its own task, so it is never seen by another
            # call; a stream's handler is not detached from it (its generator may be closed elsewhere).
            otel_context.attach(trace.set_span_in_context(span))
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                _end(span, context, error)

        def unary(behaviour):
            async def traced(request, context):
                with call_span(context):
                    return await behaviour(request, context)

            return traced

        def streaming(behaviour):
            async def traced(request, context):
                with call_span(context):
                    async for response in behaviour(request, context):
                        yield response

            return traced

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)


def _end(span: trace.Span, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
    """Ends the call's span with its status code, as the caller reads it."""
    code = context.code()
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        # the caller went away, or its deadline passed; unless the server ended the call with a status
        # meanwhile, which is what the caller reads (a stream cut off for not reading: DEADLINE_EXCEEDED)
        if code in (None, grpc.StatusCode.OK):
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
    elif error is not None and not isinstance(error, grpc.aio.AbortError):
        code = grpc.StatusCode.UNKNOWN  # what gRPC answers an exception with, whatever code was set before
    elif code is None:  # no abort, no exception
        code = grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, _text(context.details() or "") or code.name))
    span.end()
