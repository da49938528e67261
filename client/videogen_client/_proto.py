"""Conversions between videogen protobuf values and plain Python values (private)."""
from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from videogen.v1 import videogen_pb2

#: Encodings a request may ask for; "none" sends no frames (video only).
FrameEncodingName = Literal["png", "jpeg", "raw_rgb", "none"]
#: Encodings a received frame may have.
FramePayloadEncoding = Literal["png", "jpeg", "raw_rgb"]

_FRAME_ENCODINGS: dict[str, videogen_pb2.FrameEncoding] = {
    "png": videogen_pb2.FRAME_ENCODING_PNG,
    "jpeg": videogen_pb2.FRAME_ENCODING_JPEG,
    "raw_rgb": videogen_pb2.FRAME_ENCODING_RAW_RGB,
    "none": videogen_pb2.FRAME_ENCODING_NONE,
}

# The encoding of a received Frame message; UNSPECIFIED means PNG.
FRAME_PAYLOAD_ENCODINGS: dict[videogen_pb2.FrameEncoding, FramePayloadEncoding] = {
    videogen_pb2.FRAME_ENCODING_UNSPECIFIED: "png",
    videogen_pb2.FRAME_ENCODING_PNG: "png",
    videogen_pb2.FRAME_ENCODING_JPEG: "jpeg",
    videogen_pb2.FRAME_ENCODING_RAW_RGB: "raw_rgb",
}


def frame_encoding_value(name: str) -> videogen_pb2.FrameEncoding:
    """The FrameEncoding enum value for "png", "jpeg", "raw_rgb" or "none" (any case)."""
    try:
        return _FRAME_ENCODINGS[name.lower()]
    except KeyError:
        choices = ", ".join(_FRAME_ENCODINGS)
        raise ValueError(f"frame_encoding must be one of {choices}; got {name!r}") from None


def frame_encoding_name(value: int) -> str:
    """The short name of a FrameEncoding value; UNSPECIFIED means PNG."""
    if value == videogen_pb2.FRAME_ENCODING_UNSPECIFIED:
        return "png"
    return enum_name(videogen_pb2.FrameEncoding.DESCRIPTOR, value)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class EnumType(_Named, Protocol):
    """What enum_name needs of an enum descriptor (pure-Python and upb descriptors both fit)."""

    @property
    def values_by_number(self) -> Mapping[int, _Named]: ...


def enum_name(enum: EnumType, value: int) -> str:
    """An enum value's name without its type prefix, lowercased: MODEL_STATE_READY -> "ready"."""
    value_descriptor = enum.values_by_number.get(value)
    if value_descriptor is None:
        return str(value)
    prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
    return value_descriptor.name.removeprefix(prefix).lower()


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32: 0.019999999552965164 -> 0.02."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def scalar_fields(message: Message) -> dict[str, Any]:
    """A flat message's fields, all of them, as plain Python values.

    float32 fields are given their shortest decimal and enums their short lowercase name.
    """
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_FLOAT:
            value = shortest_float32(value)
        elif field.enum_type is not None:
            value = (frame_encoding_name(value) if field.enum_type.full_name == "videogen.v1.FrameEncoding"
                     else enum_name(field.enum_type, value))
        values[field.name] = value
    return values
