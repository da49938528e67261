"""What the sync and async clients share: channel settings, call metadata, request building (private)."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc
from PIL import Image
from videogen.v1 import videogen_pb2

from videogen_client._proto import frame_encoding_value
from videogen_client.errors import REQUEST_ID_METADATA_KEY, InvalidArgumentError

#: A conditioning image: encoded bytes (PNG, JPEG or WebP), a path to such a file, or a PIL image.
ImageInput = Union[bytes, str, os.PathLike[str], Image.Image]

#: Channel options as grpc takes them: (name, value) pairs.
ChannelOptions = Sequence[tuple[str, Any]]

# Every streamed message carries at most 1 MiB of payload (bigger frames are split, the MP4 comes
# in <= 1 MiB chunks), so 8 MiB leaves ample headroom, also for large ListModels answers, while
# still bounding what a misbehaving server can make the client buffer.
MAX_RECEIVE_MESSAGE_LENGTH = 8 * 1024 * 1024
# The request holds the whole conditioning image, which can be large (a 4K PNG is tens of MiB).
# grpc's client default is unlimited; 64 MiB bounds an accidental huge upload. generate() checks
# the request against this limit itself, so that the mistake is reported as INVALID_ARGUMENT on
# "image" rather than as grpc's RESOURCE_EXHAUSTED (which would read as a full queue).
MAX_SEND_MESSAGE_LENGTH = 64 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionSettings:
    """How a client connects: the target, channel options and credentials, and metadata for every call."""

    target: str
    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None  # None = plaintext
    metadata: tuple[tuple[str, str], ...]
    max_send_message_length: int  # -1 = unlimited


def connection_settings(target: str, *, secure: bool, root_certificates: bytes | None,
                        private_key: bytes | None, certificate_chain: bytes | None,
                        token: str | None, options: ChannelOptions | None) -> ConnectionSettings:
    """Validate the client constructor's arguments and turn them into :class:`ConnectionSettings`."""
    if not target:
        raise ValueError("target must be HOST:PORT (or any gRPC target string)")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain must be given together (mTLS)")
    if not secure and (root_certificates or private_key or certificate_chain):
        raise ValueError("root_certificates, private_key and certificate_chain need secure=True")
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": MAX_RECEIVE_MESSAGE_LENGTH,
        "grpc.max_send_message_length": MAX_SEND_MESSAGE_LENGTH,
    }
    merged.update(options or ())
    credentials = (grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                                certificate_chain=certificate_chain) if secure else None)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ConnectionSettings(
        target=target, options=list(merged.items()), credentials=credentials, metadata=metadata,
        max_send_message_length=int(merged["grpc.max_send_message_length"]))


def call_metadata(settings: ConnectionSettings, request_id: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of one call: the client's (authorization), plus x-request-id when given."""
    if request_id:
        return (*settings.metadata, (REQUEST_ID_METADATA_KEY, request_id))
    return settings.metadata


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of ``image``: bytes as they are, a file's contents, a PIL image as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image must be bytes, a path or a PIL.Image.Image, not {type(image).__name__}")


def build_generate_request(
    image: ImageInput, *, model: str, model_version: int | None, width: int | None, height: int | None,
    num_frames: int | None, num_inference_steps: int | None, fps: int | None, motion_bucket_id: int | None,
    noise_aug_strength: float | None, min_guidance_scale: float | None, max_guidance_scale: float | None,
    seed: int | None, decode_chunk_size: int | None, frame_encoding: str, jpeg_quality: int | None,
    stream_video: bool, video_fps: int | None, request_id: str | None, priority: int,
    queue_timeout: float | None, max_send_message_length: int,
) -> videogen_pb2.GenerateRequest:
    """The GenerateRequest for ``generate``'s arguments; optional fields are set only when given."""
    if not model:
        raise ValueError("model is required, e.g. model='svd-xt'")
    if queue_timeout is not None and queue_timeout <= 0:
        raise ValueError(f"queue_timeout must be > 0 seconds (or None for the model's), not {queue_timeout}")
    request = videogen_pb2.GenerateRequest(model=model, image=image_bytes(image))
    request.output.frame_encoding = frame_encoding_value(frame_encoding)
    fields: dict[str, Any] = {
        # Optional fields: set only when given, since an unset field means "the model's default".
        "model_version": model_version, "width": width, "height": height, "num_frames": num_frames,
        "num_inference_steps": num_inference_steps, "fps": fps, "motion_bucket_id": motion_bucket_id,
        "noise_aug_strength": noise_aug_strength, "min_guidance_scale": min_guidance_scale,
        "max_guidance_scale": max_guidance_scale, "seed": seed, "decode_chunk_size": decode_chunk_size,
        "output.jpeg_quality": jpeg_quality, "output.video_fps": video_fps,
        # Plain fields.
        "output.stream_video": stream_video, "request_id": request_id or "", "priority": priority,
        "timeout_microseconds": 0 if queue_timeout is None else max(1, round(queue_timeout * 1_000_000)),
    }
    for path, value in fields.items():
        if value is None:
            continue
        *parents, name = path.split(".")
        target: Any = request
        for parent in parents:
            target = getattr(target, parent)
        try:
            setattr(target, name, value)
        except (TypeError, ValueError) as err:  # out of the field's range, or of the wrong type
            raise type(err)(f"{path}: {err}") from None
    size = request.ByteSize()
    if 0 <= max_send_message_length < size:
        raise InvalidArgumentError(
            f"image: the request is {size} bytes, over this client's max_send_message_length of "
            f"{max_send_message_length} bytes (raise it with options=[('grpc.max_send_message_length', N)])",
            request_id=request_id)
    return request
