"""The one place where errors become gRPC statuses.

Each status also carries gRPC's rich error model (google.rpc.Status in the `grpc-status-details-bin`
trailer, as Google's APIs and grpc's own examples do, AIP-193): an ErrorInfo with the error's reason
(`QUEUE_FULL`, `OUT_OF_MEMORY`, `INVALID_FIELD`, ...), a BadRequest naming the field of an invalid
request, a PreconditionFailure naming a model config's file and field, a RetryInfo where waiting helps. Any gRPC client reads them without parsing messages.
"""
from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from ..errors import NOT_STARTED_KEY, ConfigError, InvalidRequest, NotStarted, QueueFull, VideoGenError, status_name

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error; the server log has the details"

#: The ErrorInfo domain of every videogen error.
ERROR_DOMAIN = "videogen.v1"
#: The trailer gRPC's rich error model travels in (grpc-status's STATUS_DETAILS_KEY).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: How long a caller refused for a full queue is told to wait before trying again (RetryInfo).
QUEUE_FULL_RETRY_DELAY_S = 1.0


def to_status(exc: BaseException, *, request_id: str = "", triton: bool = False) -> tuple[grpc.StatusCode, str]:
    """(code, caller-safe message); `triton`: the code Triton gives where it differs (errors.py).
    Unexpected errors are logged with their traceback, never sent."""
    code = grpc.StatusCode[status_name(exc, triton=triton)]
    if isinstance(exc, VideoGenError):
        return code, exc.message
    log.error("request %s failed unexpectedly", request_id or "-", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


def status_details(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[str, bytes]:
    """The `grpc-status-details-bin` trailer for an error answered with (code, message)."""
    reason = exc.REASON if isinstance(exc, VideoGenError) else VideoGenError.REASON
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    details = [info]
    if isinstance(exc, InvalidRequest):
        info.metadata["field"] = exc.field
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.reason)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(exc, ConfigError):  # a model whose config.pbtxt is invalid (LoadModel)
        info.metadata.update(file=exc.path, field=exc.field)
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="CONFIG", subject=f"{exc.path}: {exc.field}", description=exc.reason)
        details.append(error_details_pb2.PreconditionFailure(violations=[violation]))
    if isinstance(exc, QueueFull):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(QUEUE_FULL_RETRY_DELAY_S * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return STATUS_DETAILS_KEY, status.SerializeToString()


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, *, request_id: str = "",
                trailing_metadata: tuple[tuple[str, str], ...] = (), triton: bool = False) -> None:
    code, message = to_status(exc, request_id=request_id, triton=triton)
    if isinstance(exc, NotStarted):  # accepted, never started: the caller may send it again
        trailing_metadata = (*trailing_metadata, (NOT_STARTED_KEY, "1"))
    await context.abort(code, message, trailing_metadata=(*trailing_metadata, status_details(exc, code, message)))
