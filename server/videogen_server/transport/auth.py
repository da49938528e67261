"""Bearer-token authentication for every RPC but health checks (probes carry no token)."""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Iterable

import grpc

from ..errors import Unauthenticated
from .status import to_status

#: Methods callable without a token: Kubernetes and load-balancer probes.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _denied_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""

    async def abort_unary(request, context):
        await context.abort(code, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    # no request deserializer: a refused call's message is not parsed (an unauthenticated caller could
    # otherwise make the server build tens of MB of protobuf objects per call before hearing no)
    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` for one of the configured tokens.

    Tokens are compared in constant time (hmac.compare_digest) against every configured token, so
    the time taken says nothing about how much of a token matched or which one.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _authorized(self, metadata) -> bool:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)
        return ok

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        code, message = to_status(Unauthenticated("a valid bearer token is required (authorization: Bearer <token>)"))
        return _denied_handler(handler, code, message)
