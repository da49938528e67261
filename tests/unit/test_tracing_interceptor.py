"""TracingInterceptor on handlers of every shape, over real gRPC on loopback.

The spans go to the SDK's in-memory exporter here: the OTLP wire path is tests/integration/test_tracing.py's.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from videogen_server.transport.tracing import TracingInterceptor

SERVICE = "test.Traced"


async def _ok(request: bytes, context) -> bytes:
    return request


async def _set_code_then_raise(request: bytes, context) -> bytes:
    context.set_code(grpc.StatusCode.OK)
    raise ValueError("a bug after setting a code")


async def _abort(request: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")


def _sync(request: bytes, context) -> bytes:  # grpc.aio runs synchronous handlers too
    return b"sync:" + request


async def _written_stream(request: bytes, context) -> None:  # a stream written with context.write
    await context.write(b"one")
    await context.write(b"two")


async def _yielded_stream(request: bytes, context):
    yield b"one"
    yield b"two"


HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
    "SetCodeThenRaise": grpc.unary_unary_rpc_method_handler(_set_code_then_raise),
    "Abort": grpc.unary_unary_rpc_method_handler(_abort),
    "Sync": grpc.unary_unary_rpc_method_handler(_sync),
    "Written": grpc.unary_stream_rpc_method_handler(_written_stream),
    "Yielded": grpc.unary_stream_rpc_method_handler(_yielded_stream),
}


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    outcomes: dict[str, object] = {}

    async def run() -> None:
        server = grpc.aio.server(interceptors=[TracingInterceptor(provider.get_tracer("t"))])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for name, handler in HANDLERS.items():
                    path = f"/{SERVICE}/{name}"
                    try:
                        if handler.unary_stream:
                            outcomes[name] = [m async for m in channel.unary_stream(path)(b"x", timeout=10)]
                        else:
                            outcomes[name] = await channel.unary_unary(path)(b"x", timeout=10)
                    except grpc.aio.AioRpcError as err:
                        outcomes[name] = err.code()
        finally:
            await server.stop(None)

    asyncio.run(run())
    return outcomes, {s.name.rpartition("/")[2]: s for s in exporter.get_finished_spans()}


def test_handlers_of_every_shape_still_answer(traced) -> None:
    outcomes, _ = traced
    assert outcomes == {"Ok": b"x", "SetCodeThenRaise": grpc.StatusCode.UNKNOWN, "Abort": grpc.StatusCode.INVALID_ARGUMENT,
                        "Sync": b"sync:x", "Written": [b"one", b"two"], "Yielded": [b"one", b"two"]}


def test_the_span_has_the_code_the_caller_read(traced) -> None:
    _, spans = traced
    codes = {name: span.attributes["rpc.grpc.status_code"] for name, span in spans.items()}
    # an exception is UNKNOWN to the caller, whatever code the handler had set before raising
    assert codes == {"Ok": 0, "SetCodeThenRaise": 2, "Abort": 3, "Yielded": 0}
    assert spans["SetCodeThenRaise"].status.status_code is StatusCode.ERROR
    assert spans["Abort"].status.status_code is StatusCode.UNSET  # the caller's mistake, not the server's
    # handlers the interceptor does not wrap (synchronous ones, streams written with context.write)
    # run as they are, untraced
    assert "Sync" not in spans and "Written" not in spans
