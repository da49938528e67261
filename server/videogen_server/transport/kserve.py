"""Open Inference Protocol (KServe v2) / Triton gRPC: `inference.GRPCInferenceService` over the engine.

Served on the same port, by the same engine (scheduler, instances, metrics, request log) as
VideoGen. Tensor mapping (README, "Open Inference Protocol (KServe v2 / Triton)"):

- input `image`: BYTES [1], the encoded conditioning image (PNG, JPEG or WebP);
- conditioning, each optional, as a one-element input tensor or a request parameter of the same
  name: `width`, `height`, `num_frames`, `num_inference_steps`, `fps`, `motion_bucket_id`,
  `noise_aug_strength`, `min_guidance_scale`, `max_guidance_scale`, `seed`, `decode_chunk_size`,
  `video_fps`; `size` ([width, height] or the string "WxH") and `guidance` (one scale for both
  ends, or [min, max]) are shorthands;
- request parameters `priority` and `timeout` (queue timeout in microseconds), as in Triton;
- outputs: `frames` UINT8 [F, H, W, 3] and `video` BYTES [1] (fragmented MP4); when the request
  names no output, both. ModelStreamInfer (decoupled) sends one response per frame (`frames`
  UINT8 [H, W, 3], parameter `frame_index`), then a final response with parameter
  `triton_final_response` true (and `video` when requested); a failed request gets one response
  with `error_message` and the stream goes on.

Errors map through `errors.status_name` (transport.status), as for VideoGen. No torch here.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import struct
import uuid
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import grpc

from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc as kpb_grpc
from inference import model_config_pb2 as kmc

from .. import __version__
from ..domain import (AcceptedEvent, FrameEncoding, FrameEvent, GenerateCall, GenerationParams, ResizeMode,
                      ResolvedParams, VideoEvent)
from ..errors import MAX_FIELD_BYTES, InvalidRequest, ModelNotFound, NotLoaded, NotReady, ReaderStalled
from .servicer import (NAME_FIELD, REQUEST_ID_KEY, check_request_id, end_call_soon, refused_before_engine,
                       request_id_of, require_explicit_control, require_name)
from .status import abort, error_reason, named_as, to_status
from .tracing import incoming_trace_context, trace_context_of

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "videogen"
#: Protocol extensions implemented (Triton's names). Shared memory, trace, logging, sequence
#: batching and classification are not.
EXTENSIONS = ("model_repository", "model_configuration", "schedule_policy", "statistics", "parameters")

FINAL_RESPONSE = "triton_final_response"
FRAME_INDEX = "frame_index"


# -- the tensor contract ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str             # KServe datatype name
    shape: tuple[int, ...]    # -1: any size
    optional: bool = True
    kind: str = "int"         # how a conditioning value is read: int | float | bytes


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("image", "BYTES", (1,), optional=False, kind="bytes"),
    TensorSpec("width", "INT32", (1,)),
    TensorSpec("height", "INT32", (1,)),
    TensorSpec("size", "INT32", (2,)),                 # [width, height]
    TensorSpec("num_frames", "INT32", (1,)),
    TensorSpec("num_inference_steps", "INT32", (1,)),
    TensorSpec("fps", "INT32", (1,)),
    TensorSpec("motion_bucket_id", "INT32", (1,)),
    TensorSpec("noise_aug_strength", "FP32", (1,), kind="float"),
    TensorSpec("min_guidance_scale", "FP32", (1,), kind="float"),
    TensorSpec("max_guidance_scale", "FP32", (1,), kind="float"),
    TensorSpec("guidance", "FP32", (-1,), kind="float"),  # [scale] (both ends) or [min, max]
    TensorSpec("seed", "INT64", (1,)),
    TensorSpec("decode_chunk_size", "INT32", (1,)),
    TensorSpec("video_fps", "INT32", (1,)),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("frames", "UINT8", (-1, -1, -1, 3), kind="frames"),
    TensorSpec("video", "BYTES", (1,), kind="bytes"),
)
_INPUTS = {s.name: s for s in INPUTS}
# The engine's checks name GenerateRequest's paths: a KServe caller sent `model_name` and input tensors
# (ModelReady/ModelMetadata/ModelConfig/ModelStatistics name the model `name`: NAME_FIELD).
KSERVE_FIELDS = {"model": "model_name", "output.video_fps": "video_fps"}
_OUTPUT_NAMES = tuple(s.name for s in OUTPUTS)
_CONDITIONING = tuple(s.name for s in INPUTS if s.name != "image")

_TYPE_ENUM = {"BOOL": kmc.TYPE_BOOL, "UINT8": kmc.TYPE_UINT8, "INT32": kmc.TYPE_INT32, "INT64": kmc.TYPE_INT64,
              "FP32": kmc.TYPE_FP32, "BYTES": kmc.TYPE_STRING}
# Raw (little-endian) layouts and typed-contents fields per datatype.
_STRUCT = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
           "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d"}
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
# Request parameters Triton clients send that mean nothing here (checked, then ignored).
_IGNORED_PARAMETERS = ("sequence_start", "sequence_end", "triton_enable_empty_final_response")


@dataclasses.dataclass(frozen=True)
class InferCall:
    """A ModelInferRequest read into what the engine needs, plus the outputs to return."""

    call: GenerateCall
    outputs: tuple[str, ...]
    # the request's names for the engine's field paths (`named_as`): KSERVE_FIELDS, and `size` or
    # `guidance` for the fields the caller set through them (a width refused names the `size` sent)
    fields: Mapping[str, str] = dataclasses.field(default_factory=lambda: KSERVE_FIELDS)


def _f32(x: float) -> float:
    """Round to float32, as VideoGen's float fields do: the same request gives the same frames."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


#: Elements an input tensor may declare or hold: every input takes one or two values, so anything far
#: above is refused before it is unpacked (a 60 MB UINT16 tensor became a ~1.5 GB list of ints, on
#: the event loop).
MAX_TENSOR_ELEMENTS = 16


def _too_many(name: str, count: int) -> InvalidRequest:
    return InvalidRequest(name, f"{count} elements; the model's inputs take one or two values")


def _deserialize_bytes(name: str, raw: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if len(out) >= MAX_TENSOR_ELEMENTS:
            raise _too_many(name, len(out) + 1)
        if i + 4 > len(raw):
            raise InvalidRequest(name, "BYTES data is truncated (4-byte length prefix expected)")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidRequest(name, f"BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[i:i + n])
        i += n
    return out


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _tensor_values(t: kpb.ModelInferRequest.InferInputTensor, raw: Optional[bytes]) -> list[Any]:
    name, dt = t.name, t.datatype
    # data in one place only, as Triton and KServe require: raw_input_contents, else the contents field
    # of the datatype (a value elsewhere was ignored, silently)
    if dt not in _STRUCT and dt not in ("BYTES", "BF16"):  # (else its contents field was blamed)
        raise InvalidRequest(name, f"datatype {dt!r} is not one of the protocol's: "
                                   f"{', '.join([*_STRUCT, 'BF16', 'BYTES'])}")
    typed = [f.name for f, _ in t.contents.ListFields()]
    if raw is not None and typed:
        raise InvalidRequest(name, f"contents ({', '.join(typed)}) must not be given with raw_input_contents")
    stray = [f for f in typed if f != _CONTENTS.get(dt)]
    if stray:
        raise InvalidRequest(name, f"contents field {stray[0]} does not hold {dt} data"
                             + (f" (use {_CONTENTS[dt]})" if dt in _CONTENTS else ""))
    if any(d < 0 for d in t.shape):
        raise InvalidRequest(name, f"shape {list(t.shape)} has a negative dimension")
    count = math.prod(t.shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise _too_many(name, count)
    if raw is None and dt in _CONTENTS and len(getattr(t.contents, _CONTENTS[dt])) > MAX_TENSOR_ELEMENTS:
        raise _too_many(name, len(getattr(t.contents, _CONTENTS[dt])))
    if dt == "BYTES":
        values: list[Any] = _deserialize_bytes(name, raw) if raw is not None else list(t.contents.bytes_contents)
    elif dt in _STRUCT:
        if raw is not None:
            size = struct.calcsize(_STRUCT[dt])
            if len(raw) != count * size:
                raise InvalidRequest(name, f"{len(raw)} raw bytes do not hold shape {list(t.shape)} of {dt}")
            values = list(struct.unpack(f"<{count}{_STRUCT[dt]}", raw))
        elif dt in _CONTENTS:
            values = list(getattr(t.contents, _CONTENTS[dt]))
        else:
            raise InvalidRequest(name, f"{dt} data must come in raw_input_contents")
    else:
        raise InvalidRequest(name, f"datatype {dt!r} is not supported")
    if len(values) != count:
        raise InvalidRequest(name, f"shape {list(t.shape)} holds {count} elements, got {len(values)}")
    return values


#: The longest string a request parameter holds ("1024x576", "1.0,3.0", a mode name): a 32 MiB string
#: was split and converted on the event loop, every call on the port waiting ~11 s behind it.
MAX_PARAMETER_CHARS = 256


def _param_value(key: str, p: kpb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidRequest(key, "parameter has no value")
    value = getattr(p, which)
    if isinstance(value, str) and len(value) > MAX_PARAMETER_CHARS:
        raise InvalidRequest(key, f"a string of {len(value)} characters (at most {MAX_PARAMETER_CHARS})")
    return value


def _name(text: str, what: str) -> str:
    """A caller's tensor or parameter name, refused unless short and printable (it reaches messages
    and the request log, as a model name does)."""
    if not text or len(text) > MAX_FIELD_BYTES or not text.isprintable():
        raise InvalidRequest(what, f"{len(text)} characters, or not printable: a name is 1..{MAX_FIELD_BYTES} "
                                   f"printable characters")
    return text


def _number(name: str, value: Any, kind: str) -> Any:
    if isinstance(value, bool):
        raise InvalidRequest(name, "must be a number, not a boolean")
    if isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            raise InvalidRequest(name, f"{value!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidRequest(name, f"{value} is not an integer")
            value = int(value)
        return int(value)
    value = float(value)
    if not math.isfinite(value) or abs(value) > 3.4e38:
        raise InvalidRequest(name, f"{value} is not a finite float32")
    return _f32(value)


def _values(name: str, raw: list[Any], kind: str) -> list[Any]:
    """Values of one conditioning entry; a string parameter may list several ("64x48", "1.0,3.0")."""
    if len(raw) == 1 and isinstance(raw[0], str) and name in ("size", "guidance"):
        text = raw[0].lower().replace("x", ",") if name == "size" else raw[0]
        raw = [part.strip() for part in text.split(",")]
    return [_number(name, v, kind) for v in raw]


def parse_infer_request(req: kpb.ModelInferRequest, *, request_id: str, deadline_s: Optional[float],
                        trace_context: tuple[tuple[str, str], ...] = ()) -> InferCall:
    """Check a ModelInferRequest and build the engine call. Raises InvalidRequest naming the tensor."""
    require_name(req.model_name, "model_name")
    version = parse_version(req.model_version, "model_version")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidRequest("raw_input_contents",
                             f"{len(req.raw_input_contents)} entries for {len(req.inputs)} inputs")

    given: dict[str, list[Any]] = {}
    for i, t in enumerate(req.inputs):
        _name(t.name, f"inputs[{i}].name")
        spec = _INPUTS.get(t.name)
        if spec is None:
            raise InvalidRequest(t.name, f"unknown input; the model's inputs are {', '.join(_INPUTS)}")
        if t.name in given:
            raise InvalidRequest(t.name, "given twice")
        _no_shared_memory(t.name, t.parameters)
        # the datatype's kind first (a file sent as UINT8 was told it had too many elements); within a
        # kind any width (FP64 for an FP32 input), but never a float for an integer (a seed sent as FP32
        # was rounded to float32, silently)
        if spec.kind == "bytes" and t.datatype != "BYTES":
            raise InvalidRequest(t.name, f"must be BYTES [1] (an encoded PNG, JPEG or WebP), not {t.datatype}")
        if spec.kind != "bytes" and t.datatype == "BYTES":
            raise InvalidRequest(t.name, f"must be a number tensor ({spec.datatype} {list(spec.shape)}), not BYTES")
        if spec.kind == "int" and t.datatype in _FLOAT_TYPES:
            raise InvalidRequest(t.name, f"must be an integer tensor ({spec.datatype} {list(spec.shape)}), not "
                                         f"{t.datatype}")
        given[t.name] = _tensor_values(t, req.raw_input_contents[i] if req.raw_input_contents else None)

    priority, timeout_s, resize_mode = 0, None, ResizeMode.STRETCH
    for key, p in req.parameters.items():
        value = _param_value(_name(key, "parameters"), p)
        if key == "priority":
            priority = _number("priority", value, "int")
            if priority < 0:
                raise InvalidRequest("priority", f"{priority} is negative")
        elif key == "resize_mode":
            modes = {m.value: m for m in ResizeMode}
            if value not in modes:
                raise InvalidRequest("resize_mode", f"{value!r} is not one of {', '.join(modes)}")
            resize_mode = modes[value]
        elif key == "timeout":
            micros = _number("timeout", value, "int")
            if micros < 0:
                raise InvalidRequest("timeout", f"{micros} is negative")
            timeout_s = micros / 1e6 if micros else None
        elif key == "sequence_id":
            if value not in (0, ""):
                raise InvalidRequest("sequence_id", "sequence batching is not supported")
        elif key in _IGNORED_PARAMETERS:
            continue
        elif key in _CONDITIONING:
            if key in given:
                raise InvalidRequest(key, "given both as an input tensor and as a request parameter")
            given[key] = [value]
        else:
            raise InvalidRequest(key, "unknown request parameter; known: priority, timeout, resize_mode, "
                                 + ", ".join(_CONDITIONING))

    images = given.pop("image", None)
    if images is None:
        raise InvalidRequest("image", "required: an input tensor BYTES [1] holding an encoded PNG, JPEG or WebP")
    if len(images) != 1 or not isinstance(images[0], bytes):
        raise InvalidRequest("image", f"must hold exactly one encoded image, got {len(images)} elements")

    fields: dict[str, Any] = {}
    named = dict(KSERVE_FIELDS)
    for name, raw in given.items():
        values = _values(name, raw, _INPUTS[name].kind)
        if name == "size":
            if len(values) != 2:
                raise InvalidRequest("size", "must be [width, height] (or the string \"WIDTHxHEIGHT\")")
            targets = {"width": values[0], "height": values[1]}
        elif name == "guidance":
            if len(values) not in (1, 2):
                raise InvalidRequest("guidance", "must be one scale or [min, max]")
            targets = {"min_guidance_scale": values[0], "max_guidance_scale": values[-1]}
        else:
            if len(values) != 1:
                raise InvalidRequest(name, f"must be a single value, got {len(values)}")
            targets = {name: values[0]}
        for field, value in targets.items():
            if field in fields:
                raise InvalidRequest(name, f"sets {field}, which the request also sets otherwise")
            fields[field] = value
            if field != name:
                named[field] = name

    outputs = requested_outputs(req.outputs)
    video_fps = fields.pop("video_fps", None)
    params = GenerationParams(
        **fields,
        frame_encoding=FrameEncoding.RAW_RGB if "frames" in outputs else FrameEncoding.NONE,
        stream_video="video" in outputs, video_fps=video_fps, resize_mode=resize_mode)
    call = GenerateCall(model=req.model_name, image=images[0], params=params, model_version=version,
                        request_id=request_id, priority=priority, priority_falls_back=True, timeout_s=timeout_s,
                        deadline_s=deadline_s, trace_context=trace_context)
    return InferCall(call=call, outputs=outputs, fields=named)


#: The most a unary ModelInferResponse's frames may take: protobuf serialises no message of 2 GiB or
#: more, and the video and the rest of the message need room beside them. Past it a request failed to
#: serialise after its whole generation (a model whose limits allow ~350 frames at 1920x1080; review);
#: the engine refuses it at admission instead (GenerateCall.max_frame_bytes).
MAX_UNARY_FRAME_BYTES = 2**31 - 1 - 256 * 2**20


def requested_outputs(outputs: Iterable[kpb.ModelInferRequest.InferRequestedOutputTensor]) -> tuple[str, ...]:
    names: list[str] = []
    for o in outputs:
        if o.name not in _OUTPUT_NAMES:
            raise InvalidRequest("outputs", f"unknown output {o.name!r}; the model's outputs are "
                                 + ", ".join(_OUTPUT_NAMES))
        if "classification" in o.parameters:
            raise InvalidRequest("outputs", "classification is not supported")
        _no_shared_memory(o.name or "outputs", o.parameters)
        if o.name not in names:
            names.append(o.name)
    return tuple(names) or _OUTPUT_NAMES


def _no_shared_memory(name: str, parameters) -> None:
    """The shared-memory extension is not offered (ServerMetadata does not list it): a tensor that asks
    for it is refused, rather than read from or written to the wrong place."""
    if any(key.startswith("shared_memory_") for key in parameters):
        raise InvalidRequest(name, "shared memory is not supported; send the data in the request")


def parse_version(text: str, field: str = "version") -> Optional[int]:
    """"" = unset (None); otherwise a positive integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:  # isdigit alone takes "²"
        raise InvalidRequest(field, f"{text!r} is not a version number")
    return int(text)


def _set_param(params, key: str, value: Any) -> None:
    if isinstance(value, enum.Enum):
        params[key].string_param = str(value.value)
    elif isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = str(value)


_RESOLVED_REPORTED = ("width", "height", "num_frames", "num_inference_steps", "fps", "motion_bucket_id",
                      "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "seed", "decode_chunk_size",
                      "video_fps", "resize_mode")


def _set_resolved(params, resolved: Optional[ResolvedParams], request_id: str) -> None:
    """The parameters the generation ran with (seed included) and the request id, on a response."""
    params["request_id"].string_param = request_id
    if resolved is not None:
        for key in _RESOLVED_REPORTED:
            _set_param(params, key, getattr(resolved, key))


# -- model description -----------------------------------------------------------------------------

def tensor_metadata(specs: Iterable[TensorSpec]) -> list[kpb.ModelMetadataResponse.TensorMetadata]:
    return [kpb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def model_config_to_pb(settings, instance_groups=()) -> kmc.ModelConfig:
    """A model's config.pbtxt in Triton's ModelConfig shape, with its tensors and effective defaults.

    videogen.v1.ModelConfig uses Triton's field numbers and types for every field both have
    (version_policy, instance_group, dynamic_batching, parameters, ...), so the shared part carries
    over on the wire; model_warmup differs in type and is left out.
    """
    src = type(settings.proto)()
    src.CopyFrom(settings.proto)
    src.ClearField("model_warmup")
    cfg = kmc.ModelConfig.FromString(src.SerializeToString())
    cfg.name = settings.name
    cfg.backend = settings.backend
    # Tensors carry no batch dimension; the server batches separate requests of one shape itself
    # (dynamic_batching below, up to config.pbtxt's max_batch_size).
    cfg.max_batch_size = 0
    if cfg.HasField("dynamic_batching"):
        # sizes of the server's own batches, which Triton would refuse beside max_batch_size 0
        del cfg.dynamic_batching.preferred_batch_size[:]
        # the bound enforced (config.pbtxt's, else the server's --max-queue-size), not 0 = unbounded
        cfg.dynamic_batching.default_queue_policy.max_queue_size = settings.batching.queue_policy.max_queue_size
    if not cfg.HasField("version_policy"):
        cfg.version_policy.latest.num_versions = 1
    del cfg.instance_group[:]
    kinds = {"auto": kmc.ModelInstanceGroup.KIND_AUTO, "gpu": kmc.ModelInstanceGroup.KIND_GPU,
             "cpu": kmc.ModelInstanceGroup.KIND_CPU}
    # as loaded (Triton reports its normalised config: KIND_AUTO resolved, GPUs filled in), else as written
    for i, g in enumerate(instance_groups or settings.instance_groups):
        cfg.instance_group.add(name=f"{settings.name}_{i}", kind=kinds[g.kind], count=g.count, gpus=g.gpus)
    for s in INPUTS:
        cfg.input.add(name=s.name, data_type=_TYPE_ENUM[s.datatype], dims=s.shape, optional=s.optional)
    for s in OUTPUTS:
        cfg.output.add(name=s.name, data_type=_TYPE_ENUM[s.datatype], dims=s.shape)
    cfg.model_transaction_policy.decoupled = True
    return cfg


_INDEX_STATES = {"READY": "READY", "LOADING": "LOADING", "UNLOADING": "UNLOADING", "FAILED": "UNAVAILABLE",
                 "UNAVAILABLE": "UNAVAILABLE"}


def _duration(d) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_pb(name: str, version: int, s) -> kpb.ModelStatistics:
    return kpb.ModelStatistics(
        name=name, version=str(version), last_inference=s.last_inference_ms, inference_count=s.inference_count,
        execution_count=s.execution_count, inference_stats=kpb.InferStatistics(
            success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
            compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output), cache_hit=kpb.StatisticDuration(),
            cache_miss=kpb.StatisticDuration()))


# -- the servicer ----------------------------------------------------------------------------------

_READ_DONE = object()
_STARTED = object()
_FINISHED = object()


#: Requests of one ModelStreamInfer stream running at once, and responses waiting to be read.
STREAM_MAX_IN_FLIGHT = 64
STREAM_MAX_QUEUED = 256


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine, *, model_control_mode: str) -> None:
        self._engine = engine
        self._control = model_control_mode

    # -- health and metadata --

    async def ServerLive(self, request: kpb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._engine.ready)

    async def ModelReady(self, request: kpb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        try:
            version = parse_version(request.version)
            if version is None:
                return kpb.ModelReadyResponse(ready=self._engine.model_ready(request.name))
            try:
                status = self._engine.status(request.name)
            except ModelNotFound:
                return kpb.ModelReadyResponse(ready=False)
            ready = not self._engine.draining and any(
                v.version == version and v.state == "READY" for v in status.versions)
            return kpb.ModelReadyResponse(ready=ready)
        except Exception as exc:
            await abort(context, exc, triton=True, fields=NAME_FIELD)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def _loaded(self, name: str, version_text: str):
        """The model's status and ready versions; errors for unknown or not loaded models/versions."""
        require_name(name)
        version = parse_version(version_text)
        status = self._engine.status(name)
        # a draining server shows its ready versions UNLOADING (readiness waits go on); their metadata and
        # config are still what they are
        served = ("READY", "UNLOADING") if self._engine.draining else ("READY",)
        ready = [v.version for v in status.versions if v.state in served]
        if version is not None and version not in ready:
            if any(v.version == version for v in status.versions):
                raise NotReady(f"model {name!r} version {version} is not ready")
            raise ModelNotFound(f"model {name!r} has no loaded version {version}")
        if status.settings is None or not ready:
            raise NotLoaded(f"model {name!r} is not ready")
        return status, ready

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        try:
            status, ready = self._loaded(request.name, request.version)
            return kpb.ModelMetadataResponse(
                name=status.name, versions=[str(v) for v in ready], platform=status.backend,
                inputs=tensor_metadata(INPUTS), outputs=tensor_metadata(OUTPUTS))
        except Exception as exc:
            await abort(context, exc, triton=True, fields=NAME_FIELD)

    async def ModelConfig(self, request: kpb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ModelConfigResponse:
        try:
            status, _ = self._loaded(request.name, request.version)
            return kpb.ModelConfigResponse(config=model_config_to_pb(status.settings, status.instance_groups))
        except Exception as exc:
            await abort(context, exc, triton=True, fields=NAME_FIELD)

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> kpb.ModelStatisticsResponse:
        try:
            rows = self._engine.statistics(request.name, parse_version(request.version))
            return kpb.ModelStatisticsResponse(model_stats=[statistics_to_pb(n, v, s) for n, v, s in rows])
        except Exception as exc:
            await abort(context, exc, triton=True, fields=NAME_FIELD)

    # -- repository --

    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> kpb.RepositoryIndexResponse:
        # repository_name is not used: the index covers every --model-repository, as Triton's does.
        try:
            models = []
            for status in self._engine.list_models():
                entries = [(str(v.version), _INDEX_STATES[v.state], v.reason) for v in status.versions] or \
                    [("", "UNAVAILABLE", status.reason or "unloaded")]
                models += [kpb.RepositoryIndexResponse.ModelIndex(name=status.name, version=v, state=s, reason=r)
                           for v, s, r in entries if not request.ready or s == "READY"]
            return kpb.RepositoryIndexResponse(models=models)
        except Exception as exc:  # unexpected: INTERNAL with the generic message, as every call
            await abort(context, exc, triton=True)

    def _check_control(self, name: str, parameters) -> None:
        require_explicit_control(self._control)
        require_name(name, "model_name")
        for key in parameters:
            if key == "config" or key.startswith("file:"):
                raise InvalidRequest(f"parameters[{key!r}]", "config overrides and model files in the request are "
                                     "not supported; put them in the model repository")

    async def RepositoryModelLoad(self, request: kpb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> kpb.RepositoryModelLoadResponse:
        try:
            self._check_control(request.model_name, request.parameters)
            await self._engine.load_model(request.model_name)
            return kpb.RepositoryModelLoadResponse()
        except Exception as exc:
            await abort(context, exc, triton=True, fields=KSERVE_FIELDS)

    async def RepositoryModelUnload(self, request: kpb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> kpb.RepositoryModelUnloadResponse:
        try:
            self._check_control(request.model_name, request.parameters)  # unload_dependents: no ensembles here
            await self._engine.unload_model(request.model_name)
            return kpb.RepositoryModelUnloadResponse()
        except Exception as exc:
            await abort(context, exc, triton=True, fields=KSERVE_FIELDS)

    # -- inference --

    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        request_id = ""
        parsed: Optional[InferCall] = None
        try:
            request_id = request_id_of(request.id, context, field="id")
            parsed = parse_infer_request(request, request_id=request_id, deadline_s=context.time_remaining(),
                                         trace_context=trace_context_of(context))
            if "frames" in parsed.outputs:  # every frame in this one response
                parsed = dataclasses.replace(parsed, call=dataclasses.replace(
                    parsed.call, max_frame_bytes=MAX_UNARY_FRAME_BYTES))
            frames: list[bytes] = []
            video: list[bytes] = []
            accepted: Optional[AcceptedEvent] = None
            async with contextlib.aclosing(self._engine.generate(parsed.call)) as events:
                async for event in events:
                    if isinstance(event, FrameEvent):
                        frames.append(event.data)  # in index order
                    elif isinstance(event, VideoEvent):
                        video.append(event.data)
                    elif isinstance(event, AcceptedEvent):
                        accepted = event
            assert accepted is not None
            p = accepted.params
            response = kpb.ModelInferResponse(model_name=accepted.model, model_version=str(accepted.model_version),
                                              id=request.id)
            _set_resolved(response.parameters, p, request_id)
            for name in parsed.outputs:
                if name == "frames":
                    response.outputs.add(name="frames", datatype="UINT8", shape=(len(frames), p.height, p.width, 3))
                    response.raw_output_contents.append(b"".join(frames))
                else:
                    response.outputs.add(name="video", datatype="BYTES", shape=(1,))
                    response.raw_output_contents.append(serialize_bytes([b"".join(video)]))
            # Headers only with a result: a refusal then ends a call that sent nothing, which gRPC's
            # retry policy may send again (as Generate does); a failure carries the id in trailers.
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            return response
        except Exception as exc:  # CancelledError is not an Exception: a gone caller is not answered
            if parsed is None:
                refused_before_engine(self._engine, exc, request_id, trace_context_of(context))
            await abort(context, exc, request_id=request_id, triton=True,
                        fields=parsed.fields if parsed is not None else KSERVE_FIELDS,
                        trailing_metadata=((REQUEST_ID_KEY, request_id),) if request_id else ())

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Decoupled streaming: every request runs at once, their responses interleave (matched by id).

        The stream ends once the client has half-closed it and every request has finished; when the
        client cancels it (tritonclient's stop_stream(cancel_requests=True)) or disconnects, every
        running request is cancelled through the engine (its instance stops at the next step).
        """
        # Bounded both ways, so a client that sends without reading holds a bounded amount of memory
        # (800 000 unread error responses were 1.1 GB): at most STREAM_MAX_IN_FLIGHT requests of a
        # stream run at once (the next ones wait unread, and gRPC's flow control slows the sender), and
        # at most STREAM_MAX_QUEUED responses wait for the client to read them (the markers, two a
        # request at most, are never held back: a stream's teardown must not wait on a full queue).
        out: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        slots, room = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT), asyncio.Semaphore(STREAM_MAX_QUEUED)
        stream = asyncio.current_task()
        limit = self._engine.config.stream_send_timeout_seconds

        def reader_stalled() -> None:
            """A response waited --stream-send-timeout-seconds for the client to read (the engine does not
            time a stream's requests: its responses queue here): the stream ends with that status (sent
            after what is in flight), its running requests with it, and its queued responses are dropped."""
            exc = ReaderStalled.after(limit)
            log.info("ModelStreamInfer: %s; the stream is ended", exc)
            end_call_soon(context, exc, triton=True)
            if stream is not None:
                stream.cancel()

        async def serve(req: kpb.ModelInferRequest) -> None:
            try:
                async for message in self._stream_one(req, context):
                    await room.acquire()
                    out.put_nowait(message)
            finally:
                slots.release()
                out.put_nowait(_FINISHED)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    out.put_nowait(_STARTED)  # queued before the task's _FINISHED
                    task = asyncio.create_task(serve(req))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                out.put_nowait(_READ_DONE)

        reader = asyncio.create_task(read())
        reading, pending = True, 0
        try:
            while reading or pending:
                item = await out.get()
                if item is _READ_DONE:
                    reading = False
                elif item is _STARTED:
                    pending += 1
                elif item is _FINISHED:
                    pending -= 1
                else:
                    # returns once gRPC has taken it (flow control: the client reads)
                    timer = asyncio.get_running_loop().call_later(limit, reader_stalled) if limit else None
                    try:
                        yield item
                    finally:
                        if timer is not None:
                            timer.cancel()
                    room.release()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.warning("ModelStreamInfer: reading the request stream failed: %r", reader.exception())
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _stream_one(self, req: kpb.ModelInferRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """One request of a stream: a response per frame, then the final one; or one error response."""
        request_id = req.id or uuid.uuid4().hex
        model_version = req.model_version
        parsed: Optional[InferCall] = None
        try:
            check_request_id("id", request_id)
            parsed = parse_infer_request(req, request_id=request_id, deadline_s=context.time_remaining(),
                                         trace_context=incoming_trace_context(context))
            accepted: Optional[AcceptedEvent] = None
            video: list[bytes] = []
            async with contextlib.aclosing(self._engine.generate(parsed.call)) as events:
                async for event in events:
                    if isinstance(event, FrameEvent):
                        response = kpb.ModelInferResponse(model_name=req.model_name, model_version=model_version,
                                                          id=req.id)
                        response.parameters[FRAME_INDEX].int64_param = event.index
                        response.parameters[FINAL_RESPONSE].bool_param = False
                        response.outputs.add(name="frames", datatype="UINT8", shape=(event.height, event.width, 3))
                        response.raw_output_contents.append(event.data)
                        yield kpb.ModelStreamInferResponse(infer_response=response)
                    elif isinstance(event, VideoEvent):
                        video.append(event.data)
                    elif isinstance(event, AcceptedEvent):
                        accepted = event
                        model_version = str(event.model_version)
            final = kpb.ModelInferResponse(model_name=req.model_name, model_version=model_version, id=req.id)
            final.parameters[FINAL_RESPONSE].bool_param = True
            _set_resolved(final.parameters, accepted.params if accepted else None, request_id)
            if "video" in parsed.outputs:
                final.outputs.add(name="video", datatype="BYTES", shape=(1,))
                final.raw_output_contents.append(serialize_bytes([b"".join(video)]))
            yield kpb.ModelStreamInferResponse(infer_response=final)
        except Exception as exc:
            if parsed is None:  # (a stream's requests hang from the caller's context, as below)
                refused_before_engine(self._engine, exc, request_id, incoming_trace_context(context))
            exc = named_as(exc, parsed.fields if parsed is not None else KSERVE_FIELDS)
            code, message = to_status(exc, request_id=request_id, triton=True)
            failed = kpb.ModelInferResponse(model_name=req.model_name, model_version=model_version, id=req.id)
            failed.parameters[FINAL_RESPONSE].bool_param = True  # Triton sends a failed request's response final
            failed.parameters["request_id"].string_param = request_id
            # what a unary call's status and its details say (a stream's errors have no status of their own)
            failed.parameters["error_code"].string_param = code.name
            failed.parameters["error_reason"].string_param = error_reason(exc)
            yield kpb.ModelStreamInferResponse(error_message=message, infer_response=failed)
