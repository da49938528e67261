"""The one place where errors become gRPC statuses."""
from __future__ import annotations

import logging

import grpc

from ..errors import NOT_STARTED_KEY, NotStarted, VideoGenError, status_name

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error; the server log has the details"


def to_status(exc: BaseException, *, request_id: str = "", triton: bool = False) -> tuple[grpc.StatusCode, str]:
    """(code, caller-safe message); `triton`: the code Triton gives where it differs (errors.py).
    Unexpected errors are logged with their traceback, never sent."""
    code = grpc.StatusCode[status_name(exc, triton=triton)]
    if isinstance(exc, VideoGenError):
        return code, exc.message
    log.error("request %s failed unexpectedly", request_id or "-", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, *, request_id: str = "",
                trailing_metadata: tuple[tuple[str, str], ...] = (), triton: bool = False) -> None:
    code, message = to_status(exc, request_id=request_id, triton=triton)
    if isinstance(exc, NotStarted):  # accepted, never started: the caller may send it again
        trailing_metadata = (*trailing_metadata, (NOT_STARTED_KEY, "1"))
    await context.abort(code, message, trailing_metadata=trailing_metadata)
