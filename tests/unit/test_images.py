"""Decoding the conditioning image: modes Pillow converts to RGB in a way that loses the picture."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from videogen_server.engine.admission import decode_image
from videogen_server.engine.model_config import GenerationLimits


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grayscale_keeps_its_tones():
    """Pillow opens a 16-bit grayscale PNG as integer pixels and its RGB conversion clips them at 255:
    a mid-grey 30000 (of 65535) came out white. The high byte is the 8-bit picture."""
    ramp = (np.arange(64 * 16, dtype=np.uint32).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    for img in (Image.fromarray(ramp), Image.new("I;16", (32, 32), 30000)):
        expected = np.asarray(img).astype(np.int64) >> 8
        rgb = np.asarray(decode_image(_png(img), GenerationLimits()))
        assert rgb.shape == (*expected.shape, 3)
        assert (rgb == expected[..., None]).all()


def test_8_bit_modes_convert_as_pillow_does():
    for mode in ("L", "LA", "P", "RGBA"):
        img = Image.new("RGB", (32, 32), (200, 120, 40)).convert(mode)
        assert np.array_equal(np.asarray(decode_image(_png(img), GenerationLimits())),
                              np.asarray(img.convert("RGB")))
