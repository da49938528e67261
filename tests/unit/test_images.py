"""Decoding the conditioning image: modes Pillow converts to RGB in a way that loses the picture."""
from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from videogen_server.engine.admission import decode_image, quiet_decompression_bomb_warnings
from videogen_server.engine.model_config import GenerationLimits
from videogen_server.errors import InvalidRequest


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
    assert np.asarray(decode_image(_progressive_jpeg(512, 512, 5), GenerationLimits())).shape == (512, 512, 3)
    bomb = _progressive_jpeg(512, 512, 5000)
    with pytest.raises(InvalidRequest) as err:
        decode_image(bomb, GenerationLimits())
    assert err.value.field == "image" and "more than 100 scans" in err.value.reason
    # stray bytes between segments, which libjpeg skips (a warning) and decodes on: the walk that counts
    # scans stopped at them and let the bomb through (review of the change)
    frame = bomb.index(b"\xff\xc2")
    for junk in (b"\x00", b"\xff\x00", b"junk\xff\xff"):
        with pytest.raises(InvalidRequest, match="more than 100 scans"):
            decode_image(bomb[:frame] + junk + bomb[frame:], GenerationLimits())
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG", progressive=True)
    assert decode_image(buf.getvalue(), GenerationLimits()).size == (64, 48)


def test_what_follows_the_picture_and_metadata_bytes_are_not_scans():
    """The scan count took every FF DA pair of the upload: a motion photo (a JPEG with its MP4 after the
    picture, as phones write them) whose video held the pair a few hundred times was refused as "a JPEG
    of 758 scans" though Pillow decodes it (backend review). Only the first picture's own markers count:
    not the bytes after its end, nor those inside a metadata segment. Millions of empty segments, which
    the walk would take seconds over, are refused."""
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 140, 200)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    rng = np.random.default_rng(0)
    trailer = rng.integers(0, 256, 8 * 2**20, dtype=np.uint8).tobytes()  # ~128 FF DA pairs
    assert trailer.count(b"\xff\xda") > 100
    assert decode_image(jpeg + trailer, GenerationLimits()).size == (640, 480)
    # the pairs inside a comment segment (as an EXIF thumbnail's scans are inside APP1)
    comment = struct.pack(">BBH", 0xFF, 0xFE, 2 + 60000) + (b"\xff\xda" * 30000)
    assert decode_image(jpeg[:2] + comment + jpeg[2:], GenerationLimits()).size == (640, 480)
    # restart markers and stuffed bytes in a scan are no segments: a JPEG with restart intervals decodes
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (20, 40, 60)).save(buf, format="JPEG", restart_marker_blocks=1)
    assert decode_image(buf.getvalue(), GenerationLimits()).size == (256, 256)
    many = jpeg[:2] + struct.pack(">BBH", 0xFF, 0xFE, 2) * 20_000 + jpeg[2:]
    with pytest.raises(InvalidRequest) as err:
        decode_image(many, GenerationLimits())
    assert err.value.field == "image" and "more than 10000 segments" in err.value.reason


def _mpf_segment() -> bytes:
    """The APP2 "MPF" segment of a two-picture MPO as Pillow writes it (phones and 3-D cameras do)."""
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (16, 16), "blue")])
    data, i = buf.getvalue(), 2
    while True:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE2 and data[i + 4:i + 8] == b"MPF\0":
            return data[i:i + 2 + length]
        i += 2 + length


def test_a_scan_bomb_that_says_it_holds_several_pictures_is_refused_too():
    """Pillow opens a JPEG with a multi-picture (MPF) segment as "MPO", and the scan count was only
    taken for "JPEG": 106 more bytes made a 60 000-scan bomb decode in full (12.8 s of a preprocessing
    thread; audit). An MPO photo of a few scans is still an image."""
    plain = _progressive_jpeg(512, 512, 5000)
    bomb = plain[:2] + _mpf_segment() + plain[2:]
    assert Image.open(io.BytesIO(bomb)).format == "MPO"
    with pytest.raises(InvalidRequest) as err:
        decode_image(bomb, GenerationLimits())
    assert err.value.field == "image" and "more than 100 scans" in err.value.reason
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (64, 48), "blue")])
    assert decode_image(buf.getvalue(), GenerationLimits()).size == (64, 48)


def test_a_damaged_header_is_not_called_another_format():
    """A PNG whose header checksum is damaged is no decoder's: it was refused as "not a PNG, JPEG or
    WebP image", which sent its sender looking at the wrong thing."""
    png = bytearray(_png(Image.new("RGB", (32, 32), "red")))
    png[29] ^= 0xFF  # IHDR's CRC (8 signature + 4 length + 4 type + 13 data)
    with pytest.raises(InvalidRequest) as err:
        decode_image(bytes(png), GenerationLimits())
    assert err.value.field == "image" and "header is damaged" in err.value.reason, err.value.reason
    with pytest.raises(InvalidRequest) as err:
        decode_image(b"GIF89a" + bytes(100), GenerationLimits())
    assert "not a PNG, JPEG or WebP image" in err.value.reason


def test_decoding_leaves_the_process_warning_state_alone(monkeypatch):
    """warnings.catch_warnings swaps the process-wide filters and hook for its block: a decode interleaved
    with another thread's catch_warnings (Inductor's CUDA-graph recording) put back a dead recorder, and
    every later warning of the server went nowhere. Decoding must not touch them; an image large enough
    for Pillow's DecompressionBombWarning is still refused, by its header."""
    filters, hook = warnings.filters, warnings.showwarning
    seen = []
    real_open = Image.open

    def watched_open(*args, **kwargs):
        seen.append((warnings.filters is filters, warnings.showwarning is hook))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", watched_open)
    decode_image(_png(Image.new("RGB", (32, 32))), GenerationLimits())
    assert seen == [(True, True)]
    # over Pillow's warning threshold (89478485 pixels), under its error threshold: 12000 x 8000
    png = _png(Image.new("L", (16, 16)))
    ihdr = png[12:16] + (12000).to_bytes(4, "big") + (8000).to_bytes(4, "big") + png[24:29]
    big = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    with warnings.catch_warnings(record=True) as caught:  # the test's own
        warnings.simplefilter("always")
        with pytest.raises(InvalidRequest) as err:
            decode_image(big, GenerationLimits(max_image_pixels=89_000_000))
        assert [w.category for w in caught] == [Image.DecompressionBombWarning]  # Image.open's own
        # the engine's start-up silences it (a log line for each size a caller sent; the CI log had two)
        quiet_decompression_bomb_warnings()
        caught.clear()
        with pytest.raises(InvalidRequest):
            decode_image(big, GenerationLimits(max_image_pixels=89_000_000))
        assert caught == []
    assert "exceeds the model's limit" in str(err.value)
