"""The one place where errors become gRPC statuses.

Each status also carries gRPC's rich error model (google.rpc.Status in the `grpc-status-details-bin`
trailer, as Google's APIs and grpc's own examples do, AIP-193): an ErrorInfo with the error's reason
(`QUEUE_FULL`, `OUT_OF_MEMORY`, `INVALID_FIELD`, ...), a BadRequest naming the field of an invalid
request, a PreconditionFailure naming a model config's file and field, a RetryInfo where waiting helps.
Any gRPC client reads them without parsing messages.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from ..errors import (MAX_FIELD_BYTES, MAX_MESSAGE_BYTES, NOT_STARTED_KEY, ConfigError, InvalidRequest, NotStarted,
                      QueueFull, VideoGenError, clip, status_name)

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error; the server log has the details"

#: The ErrorInfo domain of every videogen error.
ERROR_DOMAIN = "videogen.v1"
#: The trailer gRPC's rich error model travels in (grpc-status's STATUS_DETAILS_KEY).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: How long a caller refused for a full queue is told to wait before trying again (RetryInfo) when the
#: scheduler has no estimate of when the queue has room; with one, that estimate, at least the minimum.
QUEUE_FULL_RETRY_DELAY_S = 1.0
QUEUE_FULL_MIN_RETRY_DELAY_S = 0.1
#: gRPC's server pushback trailer: a client's built-in retry policy waits that many milliseconds before
#: its next attempt instead of its own backoff, or makes none when the value is negative (gRFC A6). It is
#: the RetryInfo delay up to a bound: the pushback holds the whole call, so a client balancing over several
#: servers waits it out before its retry goes to the next one, which may have room.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
MAX_RETRY_PUSHBACK_S = 1.0
#: Longest message (UTF-8 bytes) and field path a status carries (errors.py): messages may echo a
#: caller's text (a tensor or parameter name); the message travels twice (grpc-message, percent-encoded,
#: and inside the details) and gRPC turns trailers over its 8 KiB metadata limit into RESOURCE_EXHAUSTED.


def error_reason(exc: BaseException) -> str:
    """The error's ErrorInfo reason (INTERNAL for anything unexpected)."""
    return exc.REASON if isinstance(exc, VideoGenError) else VideoGenError.REASON


def to_status(exc: BaseException, *, request_id: str = "", triton: bool = False) -> tuple[grpc.StatusCode, str]:
    """(code, caller-safe message); `triton`: the code Triton gives where it differs (errors.py).
    Unexpected errors are logged with their traceback, never sent."""
    code = grpc.StatusCode[status_name(exc, triton=triton)]
    if isinstance(exc, VideoGenError):
        return code, clip(exc.message, MAX_MESSAGE_BYTES)
    log.error("request %s failed unexpectedly", request_id or "-", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


def retry_delay(exc: BaseException) -> float | None:
    """Seconds a caller refused with `exc` is told to wait before trying again; None: waiting does not
    help (the same request would fail the same way)."""
    if not isinstance(exc, QueueFull):
        return None
    if exc.retry_after is None:
        return QUEUE_FULL_RETRY_DELAY_S
    return max(QUEUE_FULL_MIN_RETRY_DELAY_S, exc.retry_after)


def retry_pushback(delay: float, time_remaining: float | None) -> tuple[str, str]:
    """The pushback trailer for a refusal whose caller should wait `delay` seconds: that wait (at most
    MAX_RETRY_PUSHBACK_S), for gRPC's own retries to honour, or -1 (no retry) when the caller's deadline
    (`time_remaining` seconds away) ends first, so that it hears the refusal now instead of a deadline
    after a wasted wait."""
    wait = min(delay, MAX_RETRY_PUSHBACK_S)
    if time_remaining is not None and time_remaining <= wait:
        return RETRY_PUSHBACK_KEY, "-1"
    return RETRY_PUSHBACK_KEY, str(max(0, round(wait * 1000)))


def status_details(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[str, bytes]:
    """The `grpc-status-details-bin` trailer for an error answered with (code, message)."""
    info = error_details_pb2.ErrorInfo(reason=error_reason(exc), domain=ERROR_DOMAIN)
    details = [info]
    if isinstance(exc, InvalidRequest):
        field = clip(exc.field, MAX_FIELD_BYTES)
        info.metadata["field"] = field
        violation = error_details_pb2.BadRequest.FieldViolation(field=field,
                                                                description=clip(exc.reason, MAX_MESSAGE_BYTES))
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(exc, ConfigError):  # a model whose config.pbtxt is invalid (LoadModel)
        path, field = clip(exc.path, MAX_MESSAGE_BYTES // 2), clip(exc.field, MAX_FIELD_BYTES)
        info.metadata.update(file=path, field=field)
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="CONFIG", subject=f"{path}: {field}", description=clip(exc.reason, MAX_MESSAGE_BYTES))
        details.append(error_details_pb2.PreconditionFailure(violations=[violation]))
    wait = retry_delay(exc)
    if wait is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(wait * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return STATUS_DETAILS_KEY, status.SerializeToString()


def named_as(exc: BaseException, fields: Mapping[str, str]) -> BaseException:
    """`exc` naming its field as the caller's request does: the engine's checks name GenerateRequest's
    paths (`model`, `output.video_fps`), which GetModel calls `name` and a KServe request `model_name` or
    a `video_fps` input."""
    if isinstance(exc, InvalidRequest) and exc.field in fields:
        return InvalidRequest(fields[exc.field], exc.reason)
    return exc


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, *, request_id: str = "",
                trailing_metadata: tuple[tuple[str, str], ...] = (), triton: bool = False,
                fields: Mapping[str, str] = MappingProxyType({})) -> None:
    """Ends the call with `exc`'s status and details; `fields`: the request's names for the engine's
    field paths (`named_as`)."""
    exc = named_as(exc, fields)
    code, message = to_status(exc, request_id=request_id, triton=triton)
    if isinstance(exc, NotStarted):  # accepted, never started: the caller may send it again
        trailing_metadata = (*trailing_metadata, (NOT_STARTED_KEY, "1"))
    wait = retry_delay(exc)
    if wait is not None:
        trailing_metadata = (*trailing_metadata, retry_pushback(wait, context.time_remaining()))
    await abort_call(context, code, message, (*trailing_metadata, status_details(exc, code, message)), answered=exc)


async def abort_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                     trailing_metadata: tuple[tuple[str, Any], ...], answered: BaseException | None = None) -> None:
    """`context.abort`, less the memory it held: its AbortError, kept in the call's state, holds the
    handler's frames (the request, the image in it) and the exception it was raised in, in a reference
    cycle with that state that only Python's cyclic collector frees (a burst of refused 60 MiB requests
    held GBs of an idle server's memory). They are let go once the call is done. Not set-code-and-return,
    which frees them too: a unary call answered that way sends headers and an empty message before its
    status, and gRPC's retry policy does not retry a call that has sent headers.
    `answered`, the error the status answers (logged by now), lets go of its traceback too: raised in
    the preprocessing threads, it sits in a concurrent and an asyncio future that the frames of its
    traceback hold (a refused 60 MiB image stayed in such cycles until the collector ran)."""
    try:
        await context.abort(code, message, trailing_metadata=trailing_metadata)
    except grpc.aio.AbortError as err:
        # bound now: the name `err` is unbound when this block ends, before the call is done
        context.add_done_callback(functools.partial(_let_go, err))
        if answered is not None:
            context.add_done_callback(functools.partial(_let_go, answered))
        raise
    except Exception as err:
        # the status could not be sent (the call ended meanwhile: gRPC logs it with its traceback, a
        # handler may keep the record): not with the exception being answered, which reaches the request
        err.__context__ = None
        if answered is not None:
            _let_go(answered, context)
        raise


def _let_go(err: BaseException, _context: grpc.aio.ServicerContext) -> None:
    err.__traceback__ = err.__context__ = err.__cause__ = None
