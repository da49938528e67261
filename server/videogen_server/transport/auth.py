"""Bearer-token authentication for every RPC but the server's own health checks (probes carry no token)."""
from __future__ import annotations

import hmac
import logging
import math
import time
from typing import Awaitable, Callable, Iterable, Optional

import grpc

from ..errors import ModelControlNotPermitted, Unauthenticated
from .status import abort_call, status_details, to_status

#: Methods callable without a token: Kubernetes and load-balancer probes, for the services the server
#: names open (BearerTokenInterceptor's `open_health_services`); other names (a model's) need a token.
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
#: The most often a refused token is said in the log (each is counted in videogen_auth_failures_total)
DENIAL_WARNING_INTERVAL_S = 60.0

log = logging.getLogger(__name__)


def _denied_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                    trailer: tuple[tuple[str, bytes], ...] = ()) -> grpc.RpcMethodHandler:
    """A handler for `handler`'s method that only aborts, before the call's message is read: of the
    streaming-request shape (the same frames on the wire), which gRPC starts before any message
    arrives, where a unary one would first take in the whole message, up to --max-request-bytes, from
    a caller it is about to refuse (a burst of 16 such 60 MiB calls: +1.5 GB of server memory)."""

    async def abort_unary(request, context):
        await abort_call(context, code, message, trailer)

    async def abort_stream(request_or_iterator, context):
        await abort_call(context, code, message, trailer)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.stream_unary_rpc_method_handler(abort_unary, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` for one of the configured tokens.

    With `restricted` methods (model control) and their own tokens, as Triton's restricted protocols:
    those methods take only a token of `restricted_tokens` (a caller with another valid token is refused
    PERMISSION_DENIED), which is valid for every other call too. `authenticate=False`: the other methods
    need no token at all.

    Tokens are compared in constant time (hmac.compare_digest) against every configured token, so
    the time taken says nothing about how much of a token matched or which one.
    """

    def __init__(self, tokens: Iterable[str], open_health_services: Iterable[str] = ("",),
                 denial: str = "a valid bearer token is required (authorization: Bearer <token>)",
                 on_denied: Optional[Callable[[str], None]] = None, restricted: Iterable[str] = (),
                 restricted_tokens: Iterable[str] = (), authenticate: bool = True) -> None:
        self._tokens: tuple[bytes, ...] = ()  # none: every call but the open health names refused
        self._restricted_tokens: tuple[bytes, ...] = ()
        self.set_tokens(tokens)
        self.set_restricted_tokens(restricted_tokens)
        self._restricted = frozenset(restricted)
        self._authenticate = authenticate  # False: only the restricted methods need a token
        self._open_health = frozenset(open_health_services)
        self._denial = denial
        self._on_denied = on_denied
        self._denied_since_warning = 0
        self._last_warning = -math.inf

    def set_tokens(self, tokens: Iterable[str]) -> None:
        """The tokens accepted from the next call on (a rotated token file; any thread: one assignment)."""
        self._tokens = tuple(t.encode() for t in tokens)

    def set_restricted_tokens(self, tokens: Iterable[str]) -> None:
        """The tokens the restricted methods take (and every other), from the next call on."""
        self._restricted_tokens = tuple(t.encode() for t in tokens)

    @staticmethod
    def _given(metadata) -> Optional[bytes]:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return token.strip().encode()

    @staticmethod
    def _matches(given: bytes, tokens: tuple[bytes, ...]) -> bool:
        ok = False
        for expected in tokens:  # (every one, whatever matched: the time says nothing)
            ok |= hmac.compare_digest(given, expected)
        return ok

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        given = self._given(details.invocation_metadata)
        # (one read of each attribute: a reload swaps the whole tuple)
        restricted = given is not None and self._matches(given, self._restricted_tokens)
        valid = given is not None and self._matches(given, self._tokens) or restricted
        if details.method in self._restricted and self._restricted_tokens:
            if restricted:
                return handler
        elif valid or not self._authenticate:
            return handler
        if details.method not in self._restricted or not self._restricted_tokens:
            denial: Exception = Unauthenticated(self._denial)
        elif valid:
            denial = ModelControlNotPermitted("this token may not load or unload models: model control takes the "
                                              "server's model-control tokens")
        else:
            denial = Unauthenticated("a model-control bearer token is required (authorization: Bearer <token>)")
        code, message = to_status(denial)
        trailer = (status_details(denial, code, message),)
        if details.method.startswith(HEALTH_METHOD_PREFIX):  # (counted only if refused: probes are answered)
            return self._health_handler(handler, code, message, trailer, details.method)
        self._denied(details.method)
        return _denied_handler(handler, code, message, trailer)

    def _denied(self, method: str) -> None:
        """Counted, and said at most once a minute: a token rotation gone wrong (every caller refused) was
        in neither the log nor the metrics (observability review). Never the token."""
        if self._on_denied is None:
            return
        self._on_denied(method)
        self._denied_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= DENIAL_WARNING_INTERVAL_S:
            log.warning("%d calls refused without a valid bearer token (or, for model control, a model-control "
                        "token) since the last such line (this one: %s); videogen_auth_failures_total counts them",
                        self._denied_since_warning, method)
            self._denied_since_warning, self._last_warning = 0, now

    def _health_handler(self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                        trailer: tuple[tuple[str, bytes], ...], method: str) -> grpc.RpcMethodHandler:
        """Health without a token: the server's own services answer (probes carry no token); any other
        name is refused, answered or not, so a caller without a token cannot learn which models exist.
        `List` answers with the server's own names only."""
        open_services = self._open_health

        def guard(behaviour):
            async def guarded(request, context):
                if request.service not in open_services:
                    self._denied(method)
                    await abort_call(context, code, message, trailer)
                return await behaviour(request, context)

            return guarded

        async def listed(request, context):
            answer = await handler.unary_unary(request, context)
            for name in [name for name in answer.statuses if name not in open_services]:
                del answer.statuses[name]
            return answer

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if method == HEALTH_METHOD_PREFIX + "List":  # (its request names no service)
            return grpc.unary_unary_rpc_method_handler(listed, **kw)
        if handler.unary_unary:  # Check
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **kw)
        if handler.unary_stream:  # Watch (grpc_health's aio servicer writes with context.write)
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **kw)
        self._denied(method)
        return _denied_handler(handler, code, message, trailer)  # no such Health method today
