"""The VideoGen servicer: convert, call the engine, convert back. Nothing else."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from typing import Any, AsyncIterator

import grpc

from videogen.v1 import videogen_pb2 as pb
from videogen.v1 import videogen_pb2_grpc as pb_grpc

from ..errors import InvalidRequest, PermissionDenied, VideoGenError
from . import convert
from .status import abort
from .tracing import trace_context_of

REQUEST_ID_KEY = "x-request-id"
# GetModel/LoadModel/UnloadModel name the model `name` (the engine's checks say GenerateRequest's `model`)
NAME_FIELD = {"model": "name"}
MAX_REQUEST_ID_LEN = 128

log = logging.getLogger(__name__)


def request_id_of(request_id: str, context: grpc.aio.ServicerContext, field: str = "request_id") -> str:
    """The caller's id (`field` first, then x-request-id metadata), else a fresh one."""
    if not request_id:
        request_id = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
    check_request_id(field, request_id)
    return request_id or uuid.uuid4().hex


def refused_before_engine(engine, exc: Exception, request_id: str,
                          trace_context: tuple[tuple[str, str], ...] = ()) -> None:
    """Counts and logs a request the transport refused before handing it to the engine (which counts
    and logs all others): a malformed one. `request_id` is logged only when it is one we could echo;
    `trace_context` (`trace_context_of`) names its trace, as an admitted request's log line does."""
    if isinstance(exc, VideoGenError):
        engine.refused(exc, request_id if valid_request_id(request_id) else "", trace_context)


_ENDING: set[asyncio.Task[None]] = set()  # calls being ended from outside their handlers (end_call_soon)


def end_call_soon(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str = "", **kw: Any) -> None:
    """Ends a call with `exc`'s status from outside its handler, whose task is stuck writing to a caller
    that stopped reading (and is cancelled next, by whoever calls this): gRPC sends the status once the
    caller has read what is in flight (trailers follow the messages), else when the connection closes."""
    task = asyncio.ensure_future(_end_call(context, exc, request_id, **kw))
    _ENDING.add(task)
    task.add_done_callback(_ENDING.discard)


async def _end_call(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str, **kw: Any) -> None:
    try:
        await abort(context, exc, request_id=request_id, **kw)
    except grpc.aio.AbortError:  # the call's, not this task's
        pass
    except (grpc.aio.UsageError, grpc.aio.InternalError) as err:  # aborted already; the call is gone
        log.debug("request %s: its status could not be sent: %r", request_id, err)


def require_explicit_control(mode: str) -> None:
    """Repository load/unload over RPC is allowed with --model-control-mode explicit only."""
    if mode != "explicit":
        raise PermissionDenied(f"model load/unload needs --model-control-mode explicit (server runs {mode!r})")


def valid_request_id(request_id: str) -> bool:
    """gRPC metadata values are printable ASCII: an id we can echo back (and log)."""
    return len(request_id) <= MAX_REQUEST_ID_LEN and request_id.isascii() and request_id.isprintable()


def check_request_id(field: str, request_id: str) -> None:
    """An id we could not echo back is refused."""
    if not valid_request_id(request_id):
        raise InvalidRequest(field, f"at most {MAX_REQUEST_ID_LEN} printable ASCII characters")


def require_name(name: str, field: str = "name") -> None:
    """A call about one model names it: "" is a missing field, not a model called "" (NOT_FOUND)."""
    if not name:
        raise InvalidRequest(field, "required")


class VideoGenServicer(pb_grpc.VideoGenServicer):
    def __init__(self, engine, *, model_control_mode: str) -> None:
        self._engine = engine
        self._control = model_control_mode

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        request_id = ""
        headers_sent = False
        call = None
        try:
            request_id = request_id_of(request.request_id, context)
            call = convert.generate_call(request, request_id=request_id, deadline_s=context.time_remaining(),
                                         trace_context=trace_context_of(context))
            call = dataclasses.replace(call, on_reader_stalled=functools.partial(end_call_soon, context,
                                                                                 request_id=request_id))
            async with contextlib.aclosing(self._engine.generate(call)) as events:
                async for event in events:
                    if not headers_sent:
                        # Headers go out with the first event, once admitted: a refusal before that
                        # (queue full, draining) ends a call that has sent nothing, which gRPC's
                        # retry policy may send again, to another server.
                        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
                        headers_sent = True
                    for message in convert.event_to_responses(event):
                        yield message
        except Exception as exc:  # CancelledError is not an Exception: a gone caller is not answered
            if call is None:
                refused_before_engine(self._engine, exc, request_id, trace_context_of(context))
            trailer = ((REQUEST_ID_KEY, request_id),) if request_id and not headers_sent else ()
            await abort(context, exc, request_id=request_id, trailing_metadata=trailer)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            return pb.ListModelsResponse(models=[convert.model_status_to_pb(s) for s in self._engine.list_models()])
        except Exception as exc:  # unexpected ones too: INTERNAL with a generic message, as every call
            await abort(context, exc)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            require_name(request.name)
            return convert.model_status_to_pb(self._engine.status(request.name))
        except Exception as exc:
            await abort(context, exc, fields=NAME_FIELD)

    def _check_control(self, name: str) -> None:
        """A model control call: allowed in explicit mode, for a model named (as KServe's twin checks)."""
        require_explicit_control(self._control)
        require_name(name)

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self._check_control(request.name)
            await self._engine.load_model(request.name)
            return convert.model_status_to_pb(self._engine.status(request.name))
        except Exception as exc:
            await abort(context, exc, fields=NAME_FIELD)

    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        try:
            self._check_control(request.name)
            await self._engine.unload_model(request.name)
            return pb.UnloadModelResponse()
        except Exception as exc:
            await abort(context, exc, fields=NAME_FIELD)
