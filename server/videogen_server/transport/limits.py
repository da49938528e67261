"""A bound on the calls that carry an image, refused before their message is read.

gRPC reads a unary call's whole request message (up to --max-request-bytes) before its handler runs,
and nothing in gRPC bounds how many such messages a server holds at once: a burst of large requests
(each ~1.5x its size in memory while it is parsed) could take the process past its memory limit, and
the kill then loses every video in flight. Each limited method is served here through a handler of
the streaming-request shape, which gRPC starts before any message arrives: over the limit, the call is
refused at once, its message unread (what the transport buffered is dropped with the call); under it,
the handler reads the one message itself and runs the method's own behaviour. On the wire a unary and a
streaming request are the same frames, so callers see no difference but the refusal. Only the
methods named are limited: the others' messages are small when real, yet read whole as before (up to
--max-request-bytes each), and uploads gRPC's core has not yet handed over are buffered there
(README, --max-concurrent-requests).

grpc.aio's own `maximum_concurrent_rpcs` would also refuse before reading, but it counts every call,
health checks included: gRPC clients balancing over several servers hold a grpc.health.v1 Watch stream
per server, and a full count would refuse those and take whole clients out of service.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from typing import Awaitable, Callable, Mapping

import grpc

from ..errors import InvalidRequest, RequestNotSent, ServerBusy
from .servicer import REQUEST_ID_KEY, valid_request_id
from .status import abort
from .tracing import trace_context_of


class ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """At most `limit` calls of `methods` (full names, `/package.Service/Method`) in flight, from the
    call's start (before its message is read) to its end; one more is refused RESOURCE_EXHAUSTED
    (`ServerBusy`, with a retry delay; UNAVAILABLE, Triton's code for it, where `methods` maps the name to
    True: the Open Inference Protocol's). `on_refused(exc, request_id, trace_context)` counts and logs a refusal.
    Installed as the innermost interceptor: authentication refuses a caller without a token before it
    takes a place (and, given this handler's shape, without reading its message either). A caller that
    has not sent its message `read_timeout` seconds after the call's start (None: no limit) is ended
    (`RequestNotSent`): a place is not held by a stream that only opened."""

    def __init__(self, limit: int, methods: Mapping[str, bool],
                 on_refused: Callable[[Exception, str, tuple], None] = lambda exc, request_id, trace_context: None,
                 read_timeout: float | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit: {limit} is not a positive number of calls")
        self.limit = limit
        self.read_timeout = read_timeout
        self.in_flight = 0
        self._methods = dict(methods)
        self._on_refused = on_refused

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in self._methods or handler.request_streaming:
            return handler
        triton = self._methods[details.method]
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.unary_unary, triton), **kw)
        return grpc.stream_stream_rpc_method_handler(self._streaming(handler.unary_stream, triton), **kw)

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Exception, triton: bool) -> None:
        """Ends the call with `exc`, counted and logged; the caller's id (metadata) echoed."""
        request_id = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
        request_id = request_id if isinstance(request_id, str) and valid_request_id(request_id) else ""
        self._on_refused(exc, request_id, trace_context_of(context))
        await abort(context, exc, request_id=request_id, triton=triton,
                    trailing_metadata=((REQUEST_ID_KEY, request_id),) if request_id else ())

    @contextlib.asynccontextmanager
    async def _place(self, context: grpc.aio.ServicerContext, triton: bool):
        """Holds a place for the block, or ends the call (unread) when none is left."""
        if self.in_flight >= self.limit:
            await self._refuse(context, ServerBusy(f"the server has {self.limit} requests in flight, its limit "
                                                   f"(--max-concurrent-requests); retry later or on another server"),
                               triton)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _request(self, context: grpc.aio.ServicerContext, triton: bool):
        try:
            request = await asyncio.wait_for(context.read(), self.read_timeout)
        except asyncio.TimeoutError:
            await self._refuse(context, RequestNotSent(
                f"no request message {self.read_timeout:g}s after the call started "
                f"(--request-read-timeout-seconds)"), triton)
        if request is grpc.aio.EOF:  # a caller that half-closed without its message (no gRPC client does)
            await self._refuse(context, InvalidRequest("request", "the call carried no request message"), triton)
        return request

    def _unary(self, behaviour, triton: bool):
        async def limited(request_iterator, context):
            async with self._place(context, triton):
                return await behaviour(await self._request(context, triton), context)

        return limited

    def _streaming(self, behaviour, triton: bool):
        if inspect.isasyncgenfunction(behaviour):
            async def limited(request_iterator, context):
                async with self._place(context, triton):
                    request = await self._request(context, triton)
                    async with contextlib.aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response
        else:  # a stream written with context.write
            async def limited(request_iterator, context):
                async with self._place(context, triton):
                    await behaviour(await self._request(context, triton), context)

        return limited
