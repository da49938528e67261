"""Protobuf <-> domain conversion. The only module that knows both shapes."""
from __future__ import annotations

from typing import Iterator, Optional

from videogen.v1 import videogen_pb2 as pb

from ..engine.model_config import GenerationDefaults, GenerationLimits
from ..errors import InvalidRequest
from ..domain import (AcceptedEvent, EngineEvent, FrameEncoding, FrameEvent, GenerateCall, GenerationParams,
                     ProgressEvent, ResizeMode, ResolvedParams, SummaryEvent, VideoEvent)

#: Largest payload in one streamed message. A default gRPC client accepts 4 MiB; we stay far below.
MAX_PAYLOAD_BYTES = 1 << 20

_ENCODINGS = {
    pb.FRAME_ENCODING_UNSPECIFIED: FrameEncoding.PNG,
    pb.FRAME_ENCODING_PNG: FrameEncoding.PNG,
    pb.FRAME_ENCODING_JPEG: FrameEncoding.JPEG,
    pb.FRAME_ENCODING_RAW_RGB: FrameEncoding.RAW_RGB,
    pb.FRAME_ENCODING_NONE: FrameEncoding.NONE,
}
_ENCODING_TO_PB = {FrameEncoding.PNG: pb.FRAME_ENCODING_PNG, FrameEncoding.JPEG: pb.FRAME_ENCODING_JPEG,
                   FrameEncoding.RAW_RGB: pb.FRAME_ENCODING_RAW_RGB, FrameEncoding.NONE: pb.FRAME_ENCODING_NONE}
_RESIZE_MODES = {pb.RESIZE_MODE_UNSPECIFIED: ResizeMode.STRETCH, pb.RESIZE_MODE_STRETCH: ResizeMode.STRETCH,
                 pb.RESIZE_MODE_CROP: ResizeMode.CROP}
_RESIZE_MODE_TO_PB = {ResizeMode.STRETCH: pb.RESIZE_MODE_STRETCH, ResizeMode.CROP: pb.RESIZE_MODE_CROP}
_STATES = {"UNAVAILABLE": pb.MODEL_STATE_UNAVAILABLE, "LOADING": pb.MODEL_STATE_LOADING,
           "READY": pb.MODEL_STATE_READY, "UNLOADING": pb.MODEL_STATE_UNLOADING, "FAILED": pb.MODEL_STATE_FAILED}

_OPTIONAL_FIELDS = ("width", "height", "num_frames", "num_inference_steps", "fps", "motion_bucket_id",
                    "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "seed", "decode_chunk_size")


def _opt(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


def generate_call(req: pb.GenerateRequest, *, request_id: str, deadline_s: Optional[float],
                  trace_context: tuple[tuple[str, str], ...] = ()) -> GenerateCall:
    if not req.model:
        raise InvalidRequest("model", "required")
    if req.output.frame_encoding not in _ENCODINGS:
        raise InvalidRequest("output.frame_encoding", f"unknown value {req.output.frame_encoding}")
    if req.resize_mode not in _RESIZE_MODES:
        raise InvalidRequest("resize_mode", f"unknown value {req.resize_mode}")
    out = req.output
    params = GenerationParams(
        **{f: _opt(req, f) for f in _OPTIONAL_FIELDS},
        frame_encoding=_ENCODINGS[out.frame_encoding],
        jpeg_quality=_opt(out, "jpeg_quality"),
        stream_video=_opt(out, "stream_video"),
        video_fps=_opt(out, "video_fps"),
        resize_mode=_RESIZE_MODES[req.resize_mode],
    )
    if req.HasField("model_version") and req.model_version < 0:
        raise InvalidRequest("model_version", f"{req.model_version} is negative")
    return GenerateCall(
        model=req.model, image=req.image, params=params, model_version=_opt(req, "model_version") or None,
        request_id=request_id, priority=req.priority,
        timeout_s=req.timeout_microseconds / 1e6 if req.timeout_microseconds else None,
        deadline_s=deadline_s, trace_context=trace_context)


def resolved_to_pb(p: ResolvedParams) -> pb.ResolvedParameters:
    d = p.as_dict()
    d["frame_encoding"] = _ENCODING_TO_PB[p.frame_encoding]
    d["resize_mode"] = _RESIZE_MODE_TO_PB[p.resize_mode]
    return pb.ResolvedParameters(**d)


def event_to_responses(event: EngineEvent) -> Iterator[pb.GenerateResponse]:
    """One engine event as one or more stream messages (large payloads split at MAX_PAYLOAD_BYTES)."""
    if isinstance(event, FrameEvent):
        data = event.data
        parts = max(1, -(-len(data) // MAX_PAYLOAD_BYTES))
        for i in range(parts):
            yield pb.GenerateResponse(frame=pb.Frame(
                index=event.index, encoding=_ENCODING_TO_PB[event.encoding],
                data=data[i * MAX_PAYLOAD_BYTES:(i + 1) * MAX_PAYLOAD_BYTES], width=event.width,
                height=event.height, part=i, num_parts=parts, chunk_index=event.chunk_index))
    elif isinstance(event, ProgressEvent):
        yield pb.GenerateResponse(progress=pb.Progress(step=event.step, num_steps=event.num_steps,
                                                       elapsed_seconds=event.elapsed_s))
    elif isinstance(event, VideoEvent):
        data = event.data
        chunks = [data[i:i + MAX_PAYLOAD_BYTES] for i in range(0, len(data), MAX_PAYLOAD_BYTES)] or [b""]
        for i, chunk in enumerate(chunks):
            yield pb.GenerateResponse(video=pb.VideoChunk(
                data=chunk, offset=event.offset + i * MAX_PAYLOAD_BYTES, mime_type="video/mp4",
                last=event.last and i == len(chunks) - 1))
    elif isinstance(event, AcceptedEvent):
        start, end = event.eta
        yield pb.GenerateResponse(accepted=pb.Accepted(
            request_id=event.request_id, model=event.model, model_version=event.model_version,
            queue_position=event.queue_position, parameters=resolved_to_pb(event.params),
            estimated_start_seconds=start, estimated_end_seconds=end))
    elif isinstance(event, SummaryEvent):
        yield pb.GenerateResponse(summary=pb.Summary(
            request_id=event.request_id, num_frames=event.num_frames, queue_seconds=event.queue_s,
            image_encode_seconds=event.image_encode_s, denoise_seconds=event.denoise_s,
            decode_seconds=event.decode_s, video_encode_seconds=event.video_encode_s, total_seconds=event.total_s,
            first_frame_seconds=event.first_frame_s, peak_memory_bytes=event.peak_memory_bytes,
            video_bytes=event.video_bytes, batch_size=event.batch_size, device=event.device))
    else:  # pragma: no cover - a new event type without a conversion is a bug
        raise TypeError(f"no conversion for {type(event).__name__}")


def defaults_to_pb(d: GenerationDefaults, lim: GenerationLimits) -> pb.GenerationDefaults:
    """What a request gets for each unset field; decode_chunk_size for a request of the default num_frames
    (admission.resolve_params: the configured default, else every frame up to the chunk limit)."""
    return pb.GenerationDefaults(
        width=d.width, height=d.height, num_frames=d.num_frames, num_inference_steps=d.num_inference_steps,
        fps=d.fps, motion_bucket_id=d.motion_bucket_id, noise_aug_strength=d.noise_aug_strength,
        min_guidance_scale=d.min_guidance_scale, max_guidance_scale=d.max_guidance_scale,
        decode_chunk_size=min(d.decode_chunk_size or lim.decode_chunk_limit, d.num_frames), jpeg_quality=d.jpeg_quality)


def limits_to_pb(lim: GenerationLimits) -> pb.GenerationLimits:
    return pb.GenerationLimits(
        min_width=lim.min_width, max_width=lim.max_width, min_height=lim.min_height, max_height=lim.max_height,
        max_num_frames=lim.max_num_frames, max_num_inference_steps=lim.max_num_inference_steps,
        max_image_bytes=lim.max_image_bytes, max_image_pixels=lim.max_image_pixels,
        max_decode_chunk_size=lim.decode_chunk_limit)


def model_status_to_pb(status) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=status.name, backend=status.backend, state=_STATES[status.state], instances=status.instances,
        reason=status.reason,
        versions=[pb.ModelVersionInfo(version=v.version, state=_STATES[v.state], reason=v.reason)
                  for v in status.versions])
    if status.settings is not None:
        s = status.settings
        info.defaults.CopyFrom(defaults_to_pb(s.defaults, s.limits))
        info.limits.CopyFrom(limits_to_pb(s.limits))
        info.max_batch_size = s.max_batch_size
        info.config.CopyFrom(s.proto)
    return info
