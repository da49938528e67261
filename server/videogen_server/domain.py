"""Domain types shared by transport, engine and backends. No torch, no grpc here.

The transport turns protobuf messages into these and back; the engine and backends speak only
these. Frames travel as uint8 numpy arrays of shape [n, height, width, 3].
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Optional


class FrameEncoding(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    RAW_RGB = "raw_rgb"
    NONE = "none"


class ResizeMode(enum.Enum):
    """How the conditioning image is fitted to width x height."""

    STRETCH = "stretch"  # resized to width x height whatever its aspect, as diffusers' pipeline does
    CROP = "crop"  # centre-cropped to width:height first, then resized: no distortion


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """What the caller asked for; `None` means "the model's default"."""

    width: Optional[int] = None
    height: Optional[int] = None
    num_frames: Optional[int] = None
    num_inference_steps: Optional[int] = None
    fps: Optional[int] = None
    motion_bucket_id: Optional[int] = None
    noise_aug_strength: Optional[float] = None
    min_guidance_scale: Optional[float] = None
    max_guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    decode_chunk_size: Optional[int] = None
    frame_encoding: FrameEncoding = FrameEncoding.PNG
    jpeg_quality: Optional[int] = None
    stream_video: Optional[bool] = None
    video_fps: Optional[int] = None
    resize_mode: ResizeMode = ResizeMode.STRETCH


@dataclasses.dataclass(frozen=True)
class ResolvedParams:
    """Every generation parameter with the model's defaults applied and limits checked."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    min_guidance_scale: float
    max_guidance_scale: float
    seed: int
    decode_chunk_size: int
    frame_encoding: FrameEncoding
    jpeg_quality: int
    stream_video: bool
    video_fps: int
    resize_mode: ResizeMode = ResizeMode.STRETCH

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one denoising batch (same tensor shapes and steps)."""
        return (self.width, self.height, self.num_frames, self.num_inference_steps, self.guided)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (the UNet's batch doubles): some frame's scale, of
        linspace(min_guidance_scale, max_guidance_scale, num_frames), is above 1."""
        return (self.max_guidance_scale if self.num_frames > 1 else self.min_guidance_scale) > 1.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["frame_encoding"] = self.frame_encoding.value
        out["resize_mode"] = self.resize_mode.value
        return out


@dataclasses.dataclass(frozen=True)
class GenerateCall:
    """One Generate call as the transport hands it to the engine."""

    model: str
    image: bytes
    params: GenerationParams
    model_version: Optional[int] = None
    request_id: str = ""
    priority: int = 0
    # Triton's rule (KServe calls): a priority level outside the model's levels takes the default level;
    # VideoGen calls are refused instead
    priority_falls_back: bool = False
    timeout_s: Optional[float] = None  # queue timeout asked for by the request
    deadline_s: Optional[float] = None  # seconds left on the caller's gRPC deadline
    # W3C trace context (traceparent, tracestate) the request's spans hang from: the RPC's span when
    # tracing is on, else the caller's own (its trace id then still reaches the request log)
    trace_context: tuple[tuple[str, str], ...] = ()
    # A transport that sends every frame in one message (a unary KServe ModelInfer): the most their raw
    # RGB may take; more is refused at admission (field "frames"), not found after the generation
    max_frame_bytes: Optional[int] = None
    # For a transport that writes each event as it takes it (Generate): called (on the event loop, with
    # the error) when the engine ends the request because its caller took no message for
    # --stream-send-timeout-seconds; the transport ends the call with that status (queued behind the
    # message the caller has not read), and the engine then cancels the task that iterates it. None: the
    # engine does not time its consumer (KServe: a stream times its own writes, a unary call takes all).
    on_reader_stalled: Optional[Callable[[BaseException], None]] = dataclasses.field(default=None, compare=False,
                                                                                     repr=False)


# --- events the engine streams back (transport converts them to GenerateResponse) ---

@dataclasses.dataclass(frozen=True)
class AcceptedEvent:
    request_id: str
    model: str
    model_version: int
    queue_position: int
    params: ResolvedParams
    #: estimated seconds from admission until an instance starts it and until it ends, each None where
    #: not known (scheduler.Eta)
    eta: tuple[Optional[float], Optional[float]] = (None, None)


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    step: int
    num_steps: int
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class FrameEvent:
    index: int
    chunk_index: int
    encoding: FrameEncoding
    data: bytes
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class VideoEvent:
    data: bytes
    offset: int
    last: bool


@dataclasses.dataclass(frozen=True)
class SummaryEvent:
    request_id: str
    num_frames: int
    queue_s: float
    image_encode_s: float
    denoise_s: float
    decode_s: float
    video_encode_s: float
    total_s: float
    first_frame_s: float
    peak_memory_bytes: int
    video_bytes: int
    batch_size: int
    device: str


EngineEvent = AcceptedEvent | ProgressEvent | FrameEvent | VideoEvent | SummaryEvent
