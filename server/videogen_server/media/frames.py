"""Encoding single frames for the stream."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..domain import FrameEncoding


def encode_frame(frame: np.ndarray, encoding: FrameEncoding, jpeg_quality: int = 90) -> bytes:
    """One uint8 [H, W, 3] frame as PNG, JPEG or raw RGB bytes."""
    if encoding is FrameEncoding.RAW_RGB:
        return np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    image = Image.fromarray(frame, mode="RGB")
    if encoding is FrameEncoding.JPEG:
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        # compress_level 1: frames are transient stream payload; speed matters more than bytes.
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
