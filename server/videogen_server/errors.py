"""One error hierarchy for the whole server.

Engine, backends and admission raise these; `videogen_server.transport.status` is the only place
that turns them into gRPC status codes. Anything that is not a `VideoGenError` is a bug or a device
fault: the transport logs its traceback and answers INTERNAL with a generic message.
"""
from __future__ import annotations


#: Longest message (UTF-8 bytes) and field path a status or a request log line carries of an error:
#: messages may echo a caller's text (a tensor or parameter name).
MAX_MESSAGE_BYTES = 768
MAX_FIELD_BYTES = 128


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, marked with an ellipsis where cut."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes - 3].decode("utf-8", "ignore") + "\u2026"


class VideoGenError(Exception):
    """Base of every error the server reports to a caller. `message` is safe to show to callers.

    `REASON` is the error's machine-readable name within the gRPC code (google.rpc.ErrorInfo's
    `reason`, in the status details the transport attaches): callers branch on it, not on the text."""

    REASON = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(VideoGenError):
    """A request field is missing, malformed or outside the model's limits."""

    REASON = "INVALID_FIELD"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ModelNotFound(VideoGenError):
    """No model (or no such version) with that name in the repository."""

    REASON = "MODEL_NOT_FOUND"


class QueueFull(VideoGenError):
    """The model's queue is at its bound; the caller should back off and retry. `retry_after`: seconds
    until the queue is estimated to have room (an instance takes work from it), None when not known."""

    REASON = "QUEUE_FULL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(QueueFull):
    """The server has its limit of requests in flight (--max-concurrent-requests), counted from the
    call's start, before its message is read; as a full queue, the caller should back off and retry."""

    REASON = "SERVER_BUSY"


class RequestNotSent(VideoGenError):
    """The caller did not send its request message within --request-read-timeout-seconds of the call's
    start (a call holding a place of --max-concurrent-requests meanwhile)."""

    REASON = "REQUEST_NOT_SENT"


class NotReady(VideoGenError):
    """The model or server cannot take requests now (loading, unloading, failed)."""

    REASON = "MODEL_NOT_READY"


class NotLoaded(NotReady):
    """No version of the model is ready: never loaded, unloaded, still loading or failed. Triton's
    protocol answers it NOT_FOUND ("has no available versions"), as Triton does."""


class LoadFailed(NotLoaded):
    """No version of the model is ready and its last load failed: it stays so until a load succeeds
    (a mended repository in poll mode, a LoadModel), unlike one still loading. Why is for operators
    (GetModel, the log), not in the message."""

    REASON = "MODEL_LOAD_FAILED"


class Draining(NotReady):
    """The server is shutting down and admits no new requests."""

    REASON = "SERVER_DRAINING"


class NotStarted(NotReady):
    """An admitted request that no instance started ends because its version went away (the drain's end,
    an unload), or because one of them would end before the request could (handed back at once rather
    than started and stopped): nothing was done for it, so the caller may send it again, to another server. The
    transport marks the status so (trailing metadata NOT_STARTED_KEY) and the SDK resends it; counted
    as rejected, not as an error."""

    REASON = "NOT_STARTED"


#: Trailing metadata on a Generate that ended UNAVAILABLE before any work started (NotStarted): the SDK
#: sends such a request again even though it was accepted.
NOT_STARTED_KEY = "x-videogen-not-started"


class QueueTimeout(VideoGenError):
    """The request's queue timeout passed before an instance took it."""

    REASON = "QUEUE_TIMEOUT"


class DeadlinePassed(QueueTimeout):
    """The caller's own deadline (its gRPC deadline) passed while the request was queued, before the
    model's queue timeout, if any: not the model's queue timeout (QUEUE_TIMEOUT), which a caller may
    answer by sending elsewhere, but the caller's own limit."""

    REASON = "DEADLINE_PASSED"


class DeadlineUnreachable(QueueTimeout):
    """An instance was about to start the request, but its deadline would pass before even the fastest
    of its shape's latest runs alone could end: not started (its deadline would stop it, the device's
    time spent for nothing)."""

    REASON = "DEADLINE_UNREACHABLE"


class RequestCancelled(VideoGenError):
    """The request was cancelled (by its caller or by an unload) before it finished."""

    REASON = "CANCELLED"


class ReaderStalled(VideoGenError):
    """The caller took none of its stream's messages for the server's --stream-send-timeout-seconds (the
    server's deadline for a write): the server ended the request and freed what waited for the caller.
    The status follows the message in flight, so a caller that reads again gets it."""

    REASON = "READER_STALLED"

    @classmethod
    def after(cls, seconds: float) -> "ReaderStalled":
        return cls(f"the caller took no message for {seconds:g}s (the server's --stream-send-timeout-seconds)")


class OutOfMemory(VideoGenError):
    """The device ran out of memory for this request; the instance frees it and keeps serving."""

    REASON = "OUT_OF_MEMORY"


class BackendError(VideoGenError):
    """A backend failed one request in a way it could describe (shown to the caller)."""

    REASON = "BACKEND_ERROR"


class InstanceDead(VideoGenError):
    """An instance hit an unrecoverable device error, or was retired for a stall, and takes no more work."""

    REASON = "INSTANCE_FAILED"


class ConfigError(VideoGenError):
    """A model configuration (config.pbtxt) is invalid. Names the file and the field."""

    REASON = "INVALID_CONFIG"

    def __init__(self, path: str, field: str, reason: str) -> None:
        super().__init__(f"{path}: {field}: {reason}")
        self.path = path
        self.field = field
        self.reason = reason


class Unauthenticated(VideoGenError):
    """No valid bearer token on a call that needs one."""

    REASON = "UNAUTHENTICATED"


class PermissionDenied(VideoGenError):
    """The operation is disabled by the server's configuration (e.g. repository control)."""

    REASON = "MODEL_CONTROL_DISABLED"


class ModelControlNotPermitted(PermissionDenied):
    """A valid bearer token that is not one of the model-control tokens, on a model load or unload."""

    REASON = "MODEL_CONTROL_NOT_PERMITTED"


class PortUnavailable(OSError):
    """Not a caller's error: a port the server was told to listen on (gRPC, health, metrics) cannot be
    bound at start-up. Its message names the port and why; `videogen-server` says it without a traceback."""


# The one table from error to gRPC status code name. `transport.status` turns the name into a
# grpc.StatusCode; metrics and request logs use the name as the `code` label.
_STATUS_NAMES: list[tuple[type[VideoGenError], str]] = [
    (InvalidRequest, "INVALID_ARGUMENT"),
    (ModelNotFound, "NOT_FOUND"),
    (QueueFull, "RESOURCE_EXHAUSTED"),
    (OutOfMemory, "RESOURCE_EXHAUSTED"),
    (NotReady, "UNAVAILABLE"),
    (InstanceDead, "UNAVAILABLE"),
    (QueueTimeout, "DEADLINE_EXCEEDED"),
    (RequestCancelled, "CANCELLED"),
    (ReaderStalled, "DEADLINE_EXCEEDED"),
    (RequestNotSent, "DEADLINE_EXCEEDED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (ConfigError, "FAILED_PRECONDITION"),
    (BackendError, "INTERNAL"),
]


# Where Triton answers the same condition with another code, its protocol (KServe v2 / Triton gRPC) gets
# Triton's: a full queue is UNAVAILABLE ("Exceeds maximum queue size"), which Triton clients retry, and so
# are repository control outside explicit mode and a queue timeout; a model without a ready version is
# NOT_FOUND. Metrics and request logs keep VideoGen's names.
_TRITON_STATUS_NAMES: list[tuple[type[VideoGenError], str]] = [
    (QueueFull, "UNAVAILABLE"),
    (PermissionDenied, "UNAVAILABLE"),
    # the model's queue timeout is "Request timeout expired", UNAVAILABLE; the caller's own deadline and
    # one it would miss stay DEADLINE_EXCEEDED
    (DeadlinePassed, "DEADLINE_EXCEEDED"),
    (DeadlineUnreachable, "DEADLINE_EXCEEDED"),
    (QueueTimeout, "UNAVAILABLE"),
    (NotLoaded, "NOT_FOUND"),
]


def status_name(exc: BaseException, *, triton: bool = False) -> str:
    """The gRPC status code name for an error (Triton's where it differs, with `triton`); INTERNAL for
    anything unexpected."""
    for cls, name in (_TRITON_STATUS_NAMES + _STATUS_NAMES if triton else _STATUS_NAMES):
        if isinstance(exc, cls):
            return name
    return "INTERNAL"
