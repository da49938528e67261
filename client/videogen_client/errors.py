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

The original ``grpc.RpcError`` stays reachable as ``err.__cause__``. The server also sends gRPC's
rich error model (``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer): ``err.error_reason``
is its ErrorInfo reason (``"QUEUE_FULL"``, ``"OUT_OF_MEMORY"``, ``"INVALID_FIELD"``, ...),
``err.retry_delay`` its RetryInfo (seconds) and ``err.status_details`` every detail message.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidArgumentError",
    "ModelConfigError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "PermissionDeniedError",
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
#: gRPC's server pushback trailer: milliseconds to wait before retrying, negative for "do not" (gRFC A6).
RETRY_PUSHBACK_METADATA_KEY = "grpc-retry-pushback-ms"
#: The trailer of gRPC's rich error model: a serialized google.rpc.Status.
STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"
_DETAIL_TYPES = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
                 error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo,
                 error_details_pb2.QuotaFailure, error_details_pb2.DebugInfo, error_details_pb2.Help,
                 error_details_pb2.LocalizedMessage, error_details_pb2.RequestInfo)

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
        error_reason: the server's machine-readable reason (google.rpc.ErrorInfo), e.g. ``"QUEUE_FULL"``;
            ``None`` when the status carried none (gRPC's own errors).
        retry_delay: seconds the server asks the caller to wait before retrying (google.rpc.RetryInfo).
        status_details: the status's detail messages (ErrorInfo, BadRequest, RetryInfo, ...).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None, status: status_pb2.Status | None = None) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code or self.default_code
        self.details = details
        self.request_id = request_id
        self.status_details: list[Any] = _unpack(status)
        self.error_reason: str | None = next(
            (d.reason for d in self.status_details if isinstance(d, error_details_pb2.ErrorInfo)), None)
        self.retry_delay: float | None = next(
            (d.retry_delay.seconds + d.retry_delay.nanos / 1e9 for d in self.status_details
             if isinstance(d, error_details_pb2.RetryInfo)), None)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        return f"{text} (request_id={self.request_id})" if self.request_id else text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(code={self.code.name}, details={self.details!r}, "
                f"request_id={self.request_id!r})")


class InvalidArgumentError(VideoGenError):
    """INVALID_ARGUMENT: the request was refused as malformed.

    ``field`` and ``reason`` are the field the server refused and why: from the status's BadRequest
    detail, else from its message, worded ``"<field>: <reason>"`` (``field`` is ``None`` when neither
    names one, and ``reason`` is then the whole message).
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None, status: status_pb2.Status | None = None) -> None:
        super().__init__(details, code=code, request_id=request_id, status=status)
        violation = next((v for d in self.status_details if isinstance(d, error_details_pb2.BadRequest)
                          for v in d.field_violations), None)
        match = _FIELD_DETAILS.match(details)
        if violation is not None:
            self.field: str | None = violation.field
            self.reason: str = violation.description
        else:
            self.field = match.group(1) if match else None
            self.reason = match.group(2) if match else details


class ModelNotFoundError(VideoGenError):
    """NOT_FOUND: no such model (or model version) in the server's repository."""

    default_code = grpc.StatusCode.NOT_FOUND


class QueueFullError(VideoGenError):
    """RESOURCE_EXHAUSTED: the model's queue is full (or its preprocessing is), or the server has its
    limit of requests in flight (``error_reason`` ``"SERVER_BUSY"``); retry later."""

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


class PermissionDeniedError(VideoGenError):
    """PERMISSION_DENIED: a model control call (``load_model``, ``unload_model``) to a server started
    without ``--model-control-mode explicit`` (``error_reason`` ``MODEL_CONTROL_DISABLED``), or with a
    token that is not one of the server's model-control tokens (``MODEL_CONTROL_NOT_PERMITTED``)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ModelConfigError(VideoGenError):
    """FAILED_PRECONDITION: ``load_model`` of a model whose ``config.pbtxt`` the server refused.

    ``file`` and ``field`` name the file and the field (from the status's ErrorInfo; ``None`` when it
    carried none); ``details`` says why.
    """

    default_code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None, status: status_pb2.Status | None = None) -> None:
        super().__init__(details, code=code, request_id=request_id, status=status)
        info = next((d for d in self.status_details if isinstance(d, error_details_pb2.ErrorInfo)), None)
        self.file: str | None = info.metadata.get("file") if info is not None else None
        self.field: str | None = info.metadata.get("field") if info is not None else None


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
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: ModelConfigError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.UNKNOWN: InternalServerError,
    grpc.StatusCode.DATA_LOSS: InternalServerError,
}


def _unpack(status: status_pb2.Status | None) -> list[Any]:
    """The detail messages of a google.rpc.Status, unpacked (those of unknown types left out)."""
    out: list[Any] = []
    for packed in status.details if status is not None else ():
        for cls in _DETAIL_TYPES:
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                try:
                    packed.Unpack(message)
                except DecodeError:  # a corrupt detail is left out, not raised in the caller's handler
                    break
                out.append(message)
                break
    return out


def _rich_status(metadata: Any, code: grpc.StatusCode) -> status_pb2.Status | None:
    """The google.rpc.Status in ``grpc-status-details-bin``, if there is one that agrees with ``code``."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_METADATA_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return None
            return status if status.code == code.value[0] else None
    return None


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
    trailing_fn = getattr(err, "trailing_metadata", None)
    status = _rich_status(trailing_fn(), code) if callable(trailing_fn) else None
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
    reason = _unpack_reason(status)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and (
            reason == "OUT_OF_MEMORY"
            or (reason is None and details and details.startswith(_OUT_OF_MEMORY))):  # (a server without details)
        error_class = OutOfMemoryError
    return error_class(details or code.name, code=code, request_id=request_id, status=status)


def _unpack_reason(status: status_pb2.Status | None) -> str | None:
    return next((d.reason for d in _unpack(status) if isinstance(d, error_details_pb2.ErrorInfo)), None)
