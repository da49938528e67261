"""Exceptions raised by the videogen client, one class per gRPC status code that means something.

Every failed call raises a :class:`VideoGenError` subclass instead of a bare ``grpc.RpcError``::

    from videogen_client import VideoGenClient, InvalidArgumentError, QueueFullError

    with VideoGenClient("localhost:8001") as client:
        try:
            result = client.run("cat.png", model="svd-xt", width=1001)
        except InvalidArgumentError as err:
            print(err.field, err.reason)   # "width", "1001 is not a multiple of 8"
        except QueueFullError:
            ...                            # back off and retry later

The original ``grpc.RpcError`` stays reachable as ``err.__cause__``.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import grpc

__all__ = [
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "ProtocolError",
    "QueueFullError",
    "REQUEST_ID_METADATA_KEY",
    "RequestCancelledError",
    "UnauthenticatedError",
    "UnavailableError",
    "VideoGenError",
    "from_rpc_error",
]

#: Metadata key carrying the request id, in both directions.
REQUEST_ID_METADATA_KEY = "x-request-id"
#: Trailing metadata the server sets on a Generate it ended before any work (the SDK sends it again).
NOT_STARTED_METADATA_KEY = "x-videogen-not-started"

# "<field>: <reason>", where field is a proto field path such as "width" or "output.jpeg_quality".
_FIELD_DETAILS = re.compile(r"^\s*([A-Za-z_][\w.\[\]]*)\s*:\s*(.*)$", re.DOTALL)


class VideoGenError(Exception):
    """A failed videogen call.

    Attributes:
        code: the gRPC status code, e.g. ``grpc.StatusCode.NOT_FOUND``; defaults to the class's
            ``default_code``.
        details: the server's (or gRPC's) error message.
        request_id: the request's id when known (from ``x-request-id`` metadata, the server's
            Accepted event, or the id the caller sent), else ``None``.
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code or self.default_code
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        return f"{text} (request_id={self.request_id})" if self.request_id else text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code.name}, details={self.details!r}, "
                f"request_id={self.request_id!r})")


class InvalidArgumentError(VideoGenError):
    """INVALID_ARGUMENT: the request was refused as malformed.

    The server words these as ``"<field>: <reason>"``; ``field`` and ``reason`` are those two
    parts (``field`` is ``None`` when the details do not follow that form, and ``reason`` is then
    the whole message).
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(details, code=code, request_id=request_id)
        match = _FIELD_DETAILS.match(details)
        self.field: str | None = match.group(1) if match else None
        self.reason: str = match.group(2) if match else details


class ModelNotFoundError(VideoGenError):
    """NOT_FOUND: no such model (or model version) in the server's repository."""

    default_code = grpc.StatusCode.NOT_FOUND


class QueueFullError(VideoGenError):
    """RESOURCE_EXHAUSTED: the model's queue is full (or its preprocessing is); retry later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfMemoryError(VideoGenError):
    """RESOURCE_EXHAUSTED: the request did not fit in the device's memory, even run alone.

    Retrying the same request will fail the same way: ask for fewer frames, a smaller size or a
    smaller ``decode_chunk_size``.
    """

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(VideoGenError):
    """UNAVAILABLE: the server cannot be reached, is shutting down, or the model is not loaded."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(VideoGenError):
    """DEADLINE_EXCEEDED: the gRPC deadline or the request's queue timeout passed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestCancelledError(VideoGenError):
    """CANCELLED: the call was cancelled, by the client or by the server."""

    default_code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(VideoGenError):
    """UNAUTHENTICATED: the bearer token is missing or was refused."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class InternalServerError(VideoGenError):
    """INTERNAL, UNKNOWN or DATA_LOSS: the server failed while handling a valid request."""

    default_code = grpc.StatusCode.INTERNAL


class ProtocolError(VideoGenError):
    """The response stream broke the videogen protocol (e.g. a frame's parts never all arrived).

    Raised by the client itself, with code DATA_LOSS; it points to a server bug.
    """

    default_code = grpc.StatusCode.DATA_LOSS


# RESOURCE_EXHAUSTED is four things: a full queue (retry later), the server's device memory (the
# server's message starts so), gRPC's refusal of a request over the server's size limit ("SERVER:
# Received message larger than max", unprefixed in older gRPC), and this client's gRPC refusing a
# response over its own grpc.max_receive_message_length ("CLIENT: ...").
_OUT_OF_MEMORY = "out of device memory"
_TOO_LARGE = re.compile(r"Received message larger than max")
_TOO_LARGE_HERE = re.compile(r"CLIENT: Received message larger than max")


def response_too_large_for_client(err: grpc.RpcError) -> bool:
    """Whether ``err`` is this client's own gRPC refusing a response over its receive limit: the server
    did the work, so the call is neither the caller's input's fault nor one to send again."""
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    return bool(details) and _TOO_LARGE_HERE.search(details) is not None

_ERROR_CLASSES: dict[grpc.StatusCode, type[VideoGenError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFullError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.UNKNOWN: InternalServerError,
    grpc.StatusCode.DATA_LOSS: InternalServerError,
}


def _metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of ``key`` in sync (tuple of pairs) or aio (``grpc.aio.Metadata``) metadata."""
    for item_key, value in metadata or ():
        if item_key == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def from_rpc_error(err: grpc.RpcError, *, request_id: str | None = None) -> VideoGenError:
    """Convert a ``grpc.RpcError`` (sync, or ``grpc.aio.AioRpcError``) to a :class:`VideoGenError`.

    The request id is read from the ``x-request-id`` trailing metadata, then the initial metadata;
    ``request_id`` is the fallback when neither carries one. Codes without a dedicated class map to
    :class:`VideoGenError` itself. Example::

        try:
            stub.GetModel(videogen_pb2.GetModelRequest(name="nope"))
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from rpc_error   # ModelNotFoundError
    """
    # A bare grpc.RpcError need not be a grpc.Call; the concrete errors raised by grpc are.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    for accessor in ("trailing_metadata", "initial_metadata"):
        metadata_fn = getattr(err, accessor, None)
        found = _metadata_value(metadata_fn(), REQUEST_ID_METADATA_KEY) if callable(metadata_fn) else None
        if found:
            request_id = found
            break
    error_class = _ERROR_CLASSES.get(code, VideoGenError)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details:
        if _TOO_LARGE_HERE.search(details):
            return VideoGenError(f"a response was larger than this client accepts; raise the channel option "
                                 f"grpc.max_receive_message_length ({details})", code=code, request_id=request_id)
        if _TOO_LARGE.search(details):
            # gRPC's own refusal of a message over the server's --max-request-bytes: the image is too big
            return InvalidArgumentError(f"image: the request is larger than the server accepts ({details})",
                                        code=grpc.StatusCode.INVALID_ARGUMENT, request_id=request_id)
        if details.startswith(_OUT_OF_MEMORY):
            error_class = OutOfMemoryError
    return error_class(details or code.name, code=code, request_id=request_id)
