"""Decoding the conditioning image: modes Pillow converts to RGB in a way that loses the picture."""
from __future__ import annotations

import io

import numpy as np
import pytest
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


def _progressive_jpeg(width: int, height: int, ac_scans: int) -> bytes:
    """A valid grayscale progressive JPEG whose AC scans hold nothing but end-of-band runs: a few bytes
    each, while a decoder walks every block for each one. width x height / 64 must be 4096..32767 blocks."""
    import struct

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    def bits(codes: list[tuple[int, int]]) -> bytes:  # (value, length) pairs, MSB first, 0xFF stuffed
        acc, n, out = 0, 0, bytearray()
        for value, length in codes + [(2**((8 - n % 8) % 8) - 1, (8 - sum(c[1] for c in codes) % 8) % 8)]:
            for i in range(length - 1, -1, -1):
                acc, n = (acc << 1) | ((value >> i) & 1), n + 1
                if n % 8 == 0:
                    out += bytes([acc & 0xFF]) + (b"\x00" if acc & 0xFF == 0xFF else b"")
        return bytes(out)

    blocks = (width // 8) * (height // 8)
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64))
    out += segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")  # SOF2, one component
    out += segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # DC table: difference 0 is "0"
    out += segment(0xC4, b"\x10" + bytes([0, 1] + [0] * 14) + b"\xc0")  # AC table: EOB run of 2^12+ is "00"
    out += segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + bits([(0, 1)] * blocks)  # DC scan
    out += (segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + bits([(0, 2), (blocks - 4096, 12)])) * ac_scans
    return out + b"\xff\xd9"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    """Each scan is a pass over every block: 5 000 scans of a few bytes each held a preprocessing thread
    for 9 s at 36 MP (minutes near the byte limit). Ordinary progressive JPEGs (~10 scans) decode."""
    from videogen_server.errors import InvalidRequest

    assert np.asarray(decode_image(_progressive_jpeg(512, 512, 5), GenerationLimits())).shape == (512, 512, 3)
    bomb = _progressive_jpeg(512, 512, 5000)
    with pytest.raises(InvalidRequest) as err:
        decode_image(bomb, GenerationLimits())
    assert err.value.field == "image" and "5001 scans" in err.value.reason
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG", progressive=True)
    assert decode_image(buf.getvalue(), GenerationLimits()).size == (64, 48)
