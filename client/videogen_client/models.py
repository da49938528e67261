"""What the server says about its models (``list_models`` / ``get_model``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from videogen.v1 import videogen_pb2

from videogen_client._proto import enum_name, scalar_fields

__all__ = ["ModelInfo", "ModelVersion"]

_MODEL_STATE = videogen_pb2.ModelState.DESCRIPTOR


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model: its state ("ready", "loading", "failed", ...) and, if it failed, why."""

    version: int
    state: str
    reason: str


@dataclass(frozen=True)
class ModelInfo:
    """One model in the server's repository.

    Attributes:
        name: the model's name, as passed to ``generate(model=...)``.
        backend: the backend serving it.
        state: the latest version's state: "unavailable" (known, not loaded), "loading", "ready",
            "unloading", "failed" or "unspecified".
        versions: every version the server knows, with its state.
        defaults: the generation parameters a request gets when it leaves them unset (width,
            height, num_frames, num_inference_steps, fps, motion_bucket_id, noise_aug_strength,
            min_guidance_scale, max_guidance_scale, decode_chunk_size).
        limits: the bounds the server enforces (min_width, max_width, min_height, max_height,
            max_num_frames, max_num_inference_steps, max_image_bytes, max_image_pixels,
            max_decode_chunk_size).
            Both are empty for a model whose configuration the server has not read (one never
            loaded in explicit mode, or whose config failed to parse).
        max_batch_size: how many requests one denoising batch may hold.
        reason: why the model does not serve, if it does not (a config error names its file and
            field; a failed load, its versions' reasons); empty otherwise.
        instances: how many instances of the model are loaded.
        config: the model's configuration (config.pbtxt) in protobuf's JSON mapping, with the
            proto field names (64-bit integers are strings there).
    """

    name: str
    backend: str
    state: str
    versions: list[ModelVersion]
    defaults: dict[str, Any]
    limits: dict[str, Any]
    max_batch_size: int
    instances: int
    config: dict[str, Any]
    reason: str = ""

    @classmethod
    def from_proto(cls, message: videogen_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=message.name,
            backend=message.backend,
            state=enum_name(_MODEL_STATE, message.state),
            versions=[ModelVersion(version=v.version, state=enum_name(_MODEL_STATE, v.state), reason=v.reason)
                      for v in message.versions],
            defaults=scalar_fields(message.defaults) if message.HasField("defaults") else {},
            limits=scalar_fields(message.limits) if message.HasField("limits") else {},
            max_batch_size=message.max_batch_size,
            instances=message.instances,
            config=MessageToDict(message.config, preserving_proto_field_name=True),
            reason=message.reason,
        )
