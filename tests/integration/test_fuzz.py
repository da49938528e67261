"""Property-based bad input (hypothesis) through real gRPC to the session's tiny server.

Requests are drawn as a valid, cheap request (every field unset or a valid value; 1-2 frames and
steps, small sizes, so accepted ones run in a fraction of a second) with up to three fields
replaced by anything their proto type can hold (negative, huge, nan/inf, unknown enum values,
random model names), and images drawn from random bytes, truncated or corrupted PNG/JPEG/WebP,
headers claiming huge dimensions, odd modes and animated GIF/WebP/APNG.

The properties: a request with no replaced field completes (Accepted first, Summary last, the
resolved parameters equal the ones sent). Any other request either completes too, or ends with
INVALID_ARGUMENT whose details are "<field>: <reason>" naming one of the replaced fields, or with
NOT_FOUND naming the model; a queue timeout (DEADLINE_EXCEEDED) only when the timeout was
replaced. Never INTERNAL or UNKNOWN, never a stream that outlives its deadline. After each run the
server has counted no INTERNAL request and still serves a valid request.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from typing import Any, Optional

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from videogen.v1 import videogen_pb2 as pb

from ..helpers import collect, request, sample_png

MODEL = "svd-tiny"
CALL_TIMEOUT = 30.0  # gRPC deadline per call: an answer slower than this is a hang
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)

# Where a GenerateRequest field lives: top level, or "output.<name>".
REQUEST_FIELDS = tuple(f.name for f in pb.GenerateRequest.DESCRIPTOR.fields if f.name != "output")
OUTPUT_FIELDS = tuple(f"output.{f.name}" for f in pb.OutputOptions.DESCRIPTOR.fields)
ALL_FIELDS = REQUEST_FIELDS + OUTPUT_FIELDS
# Fields whose errors name the other one of the pair (min > max names min_guidance_scale; NONE
# frames without video names output.frame_encoding).
COUPLED = {"min_guidance_scale": {"max_guidance_scale"}, "max_guidance_scale": {"min_guidance_scale"},
           "output.stream_video": {"output.frame_encoding"}, "output.frame_encoding": {"output.stream_video"}}

# VIDEOGEN_FUZZ_EXAMPLES=2000 explores further (with --timeout 0: pytest-timeout's 120 s per test);
# the default keeps the file well under 40 s on 2 cores.
EXAMPLES = int(os.environ.get("VIDEOGEN_FUZZ_EXAMPLES", "90"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# -- images -----------------------------------------------------------------------------------------

# (format, mode) pairs Pillow can write; the server converts each mode to RGB.
IMAGE_KINDS = [("PNG", m) for m in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")] + \
              [("JPEG", m) for m in ("RGB", "L", "CMYK")] + [("WEBP", m) for m in ("RGB", "RGBA")]


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    base = Image.new("RGB", size, (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))
    if size[0] > 2 and size[1] > 2:
        base.paste((255 - seed % 256, 40, 200), (0, 0, size[0] // 2, size[1] // 2))
    if mode == "I;16":
        return base.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    return base.convert(mode)


def _encode(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(mode, size, seed).save(buffer, format=fmt)
    return buffer.getvalue()


# What the property-based tests steer around: a tiny JPEG whose header claims millions of pixels
# (under max_image_pixels, 40M) is decoded (libjpeg pads the missing data) and preprocessed at full
# size on the server's preprocessing threads before it is queued (6000x6000: about 30 s of CPU here).
# That is a legitimate, slow request, not a fault; generating many would only make this file slow.
SLOW_PIXELS = 1_000_000


def known_server_issue(data: bytes) -> bool:
    """Whether ``data`` opens (header only) as an image too large to preprocess quickly (see above)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # noqa: BLE001 - not an image Pillow can open (or a bomb it refuses): neither issue
        return False
    return SLOW_PIXELS < width * height <= 40_000_000


def _animated(fmt: str, size: tuple[int, int], frames: int) -> bytes:
    images = [_image("RGB", size, 97 * i + 5) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    data = bytearray(_encode("PNG", "RGB", (1, 1), 0))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _huge_jpeg(width: int, height: int) -> bytes:
    data = bytearray(_encode("JPEG", "RGB", (8, 8), 0))
    sof = data.index(b"\xff\xc0")  # baseline SOF: marker, length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _huge_webp(width: int, height: int) -> bytes:
    data = bytearray(_encode("WEBP", "RGB", (8, 8), 0))
    start = data.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    data[start + 3:start + 7] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


# Valid images have sides of at least 8 pixels (the server's MIN_IMAGE_SIDE); smaller ones are
# mangled images, expected to be refused (test_tiny_images_are_invalid_argument).
sizes = st.tuples(st.integers(8, 48), st.integers(8, 48))
valid_images = st.one_of(
    st.just(sample_png()),
    st.builds(lambda kind, size, seed: _encode(kind[0], kind[1], size, seed),
              st.sampled_from(IMAGE_KINDS), sizes, st.integers(0, 2**24)),
    st.builds(_animated, st.sampled_from(["WEBP", "PNG"]), sizes, st.integers(2, 3)),  # animated WebP, APNG
).filter(lambda data: not known_server_issue(data))


@st.composite
def mangled_images(draw) -> bytes:
    data = draw(valid_images)
    if draw(st.booleans()):  # truncated
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    out = bytearray(data)
    for index, value in flips:
        out[index] = value
    return bytes(out)


huge = st.one_of(st.integers(2, 2**31 - 1), st.integers(2, 1000),
                 st.sampled_from([6325, 6500, 40000, 65535, 2**24, 2**31 - 1]))
wild_images = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda magic, rest: magic + rest,
              st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ", b"GIF89a"]),
              st.binary(max_size=256)),
    mangled_images(),
    st.builds(_huge_png, huge, huge),
    st.builds(_huge_jpeg, st.integers(2, 65535), st.integers(2, 65535)),
    st.builds(_huge_webp, st.integers(2, 16383), st.integers(2, 16383)),
    st.builds(_animated, st.just("GIF"), sizes, st.integers(1, 3)),  # GIF: not an accepted format
    valid_images,
).filter(lambda data: not known_server_issue(data))

# -- requests ---------------------------------------------------------------------------------------

SMALL_SIZES = st.sampled_from([16, 24, 32, 40, 48, 56, 64])
# Valid values, cheap to run (None = unset: the model's default; the tiny model's defaults are
# 64x48, 4 frames, 4 steps, so unset frames and steps are drawn less often).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(MODEL),
    "model_version": st.sampled_from([None, 0, 1]),
    "image": valid_images,
    "width": st.none() | SMALL_SIZES,
    "height": st.none() | SMALL_SIZES,
    "num_frames": st.integers(1, 2) | st.integers(1, 2) | st.none(),
    "num_inference_steps": st.integers(1, 2) | st.integers(1, 2) | st.none(),
    "fps": st.none() | st.integers(1, 240),
    "motion_bucket_id": st.none() | st.integers(0, 1023),
    "noise_aug_strength": st.none() | st.floats(0.0, 10.0, width=32),
    "min_guidance_scale": st.none(),  # drawn together with max below
    "max_guidance_scale": st.none(),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "decode_chunk_size": st.none() | st.integers(1, 4) | st.integers(1, 16),  # up to max_num_frames
    "request_id": st.just("") | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=128),
    "priority": st.sampled_from([0, 1, 2]),
    "timeout_microseconds": st.sampled_from([0, 60_000_000, 2**64 - 1]),
    # CROP is valid but can be refused for a size far from the image's aspect (a sliver): WILD draws it
    "resize_mode": st.sampled_from([0, 1]),
    "output.frame_encoding": st.sampled_from([0, 1, 2, 3, 4]),
    "output.jpeg_quality": st.none() | st.integers(1, 100),
    "output.stream_video": st.none() | st.booleans(),
    "output.video_fps": st.none() | st.integers(1, 240),
}
assert set(VALID) == set(ALL_FIELDS), set(ALL_FIELDS) ^ set(VALID)


def _cheap(strategy: st.SearchStrategy[int], low: int, high: int) -> st.SearchStrategy[int]:
    """``strategy`` without the valid but slow values ``low..high`` (many frames, steps, big sizes)."""
    return strategy.filter(lambda v: not low <= v <= high)


# Anything the field's proto type can hold (valid values included).
WILD: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["", "no-such-model", "SVD-TINY", "svd-tiny ", "../svd-tiny", "svd-tiny\0"])
    | st.text(max_size=40),
    "model_version": st.none() | INT64 | st.sampled_from([-1, 0, 1, 2, 2**63 - 1]),
    "image": wild_images,
    "width": _cheap(INT32, 72, 256) | st.sampled_from([0, -8, 8, 15, 60, 257, 264, 1024, 2**31 - 1, -2**31]),
    "height": _cheap(INT32, 72, 256) | st.sampled_from([0, -8, 8, 15, 44, 257, 264, 1024, 2**31 - 1, -2**31]),
    "num_frames": _cheap(INT32, 3, 16) | st.sampled_from([0, -1, 17, 2**31 - 1]),
    "num_inference_steps": _cheap(INT32, 3, 50) | st.sampled_from([0, -1, 51, 2**31 - 1]),
    "fps": st.none() | INT32 | st.sampled_from([0, -1, 241]),
    "motion_bucket_id": st.none() | INT32 | st.sampled_from([-1, 1024]),
    "noise_aug_strength": st.none() | FLOAT32,
    "min_guidance_scale": st.none() | FLOAT32,
    "max_guidance_scale": st.none() | FLOAT32,
    "seed": st.none() | INT64,
    "decode_chunk_size": st.none() | INT32 | st.sampled_from([0, -1, 2**16 + 1]),
    # ASCII only: a printable non-ASCII id is a known server bug (test_non_ascii_request_id_is_not_internal).
    "request_id": st.text(st.characters(max_codepoint=127), max_size=200)
    | st.sampled_from(["x" * 129, "tab\there", "new\nline", "\x00", "\x7f", "\u2028", "\u200b", "\ud7ff\x85"]),
    "priority": UINT32 | st.sampled_from([3, 2**32 - 1]),
    "timeout_microseconds": UINT64 | st.sampled_from([1, 1000]),
    "resize_mode": INT32 | st.sampled_from([2, 3, -1]),
    "output.frame_encoding": INT32 | st.sampled_from([5, -1]),
    "output.jpeg_quality": st.none() | INT32 | st.sampled_from([0, 101]),
    "output.stream_video": st.none() | st.booleans(),
    "output.video_fps": st.none() | INT32 | st.sampled_from([0, 241]),
}
assert set(WILD) == set(ALL_FIELDS)


@st.composite
def valid_guidance(draw) -> tuple[Optional[float], Optional[float]]:
    """(min, max) that the server accepts, each possibly unset (defaults 1.0 and 3.0)."""
    low = draw(st.none() | st.floats(0.0, 3.0, width=32))
    high = draw(st.none() | st.floats(3.0, 50.0, width=32) | st.floats(0.0, 50.0, width=32))
    if low is not None and high is not None and low > high:
        low, high = high, low
    if low is None and high is not None and high < 1.0:
        low = high  # unset min is 1.0: keep min <= max
    if high is None and low is not None and low > 3.0:
        high = low
    return low, high


@st.composite
def fuzzed_requests(draw, wild_fields=st.lists(st.sampled_from(ALL_FIELDS), max_size=3, unique=True)):
    """(fields, replaced): field values by path (None = unset), and the names replaced by wild values."""
    fields = {name: draw(strategy) for name, strategy in VALID.items()}
    fields["min_guidance_scale"], fields["max_guidance_scale"] = draw(valid_guidance())
    if fields["output.frame_encoding"] == pb.FRAME_ENCODING_NONE and fields["output.stream_video"] is False:
        fields["output.stream_video"] = True
    replaced = set(draw(wild_fields))
    for name in sorted(replaced):
        fields[name] = draw(WILD[name])
    return fields, replaced


def build(fields: dict[str, Any]) -> pb.GenerateRequest:
    message = pb.GenerateRequest()
    for path, value in fields.items():
        if value is None:
            continue
        target = message.output if path.startswith("output.") else message
        setattr(target, path.split(".")[-1], value)
    return message


# -- the oracle -------------------------------------------------------------------------------------


def check_answer(stub, fields: dict[str, Any], replaced: set[str]) -> str:
    """Send the request; assert the answer is one the properties allow. Returns its kind."""
    message = build(fields)
    try:
        responses = collect(stub, message, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        context = f"{code.name}: {details!r} for replaced={sorted(replaced)} request={_short(message)}"
        assert replaced, "a valid request failed: " + context
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            field, sep, reason = details.partition(": ")
            assert sep and reason and field in ALL_FIELDS, "details do not name a field: " + context
            allowed = set(replaced).union(*(COUPLED.get(name, set()) for name in replaced))
            assert field in allowed, f"names {field}, which was valid: " + context
        elif code == grpc.StatusCode.NOT_FOUND:
            assert details.startswith("model "), context
            assert replaced & {"model", "model_version"}, context
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the server's queue timeout, not our deadline
            assert "timeout_microseconds" in replaced and message.timeout_microseconds, "a hang? " + context
            assert "queue timeout" in details, "a hang? " + context
        else:
            pytest.fail("unexpected status " + context)
        return code.name
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[0] == "accepted" and kinds[-1] == "summary" and kinds.count("summary") == 1, kinds
    params = responses[0].accepted.parameters
    for name in ("width", "height", "num_frames", "num_inference_steps", "fps", "motion_bucket_id",
                 "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "seed"):
        if message.HasField(name):
            assert getattr(params, name) == getattr(message, name), (name, params)
    assert kinds.count("progress") == params.num_inference_steps
    frames = {r.frame.index for r in responses if r.WhichOneof("event") == "frame"}
    expect_frames = 0 if params.frame_encoding == pb.FRAME_ENCODING_NONE else params.num_frames
    assert len(frames) == expect_frames, (len(frames), params)
    assert ("video" in kinds) == params.stream_video
    assert responses[-1].summary.num_frames == params.num_frames
    return "OK"


def _short(message: pb.GenerateRequest) -> str:
    shown = pb.GenerateRequest()
    shown.CopyFrom(message)
    shown.image = shown.image[:32]
    return f"{{{str(shown).strip()}}} (image {len(message.image)} bytes)".replace("\n", ", ")


def _internal_count(server) -> float:
    return (server.metric("videogen_requests_total", code="INTERNAL")
            + server.metric("videogen_requests_total", code="UNKNOWN"))


def _still_serves(server) -> None:
    responses = collect(server.stub(), request(num_frames=1, num_inference_steps=1), timeout=CALL_TIMEOUT)
    assert responses[-1].WhichOneof("event") == "summary"


# -- the tests --------------------------------------------------------------------------------------


def test_fuzzed_requests_get_a_clean_answer(tiny_server):
    internal = _internal_count(tiny_server)
    stub = tiny_server.stub()
    seen: dict[str, int] = {}

    @FUZZ
    @given(case=fuzzed_requests())
    def check(case):
        kind = check_answer(stub, *case)
        seen[kind] = seen.get(kind, 0) + 1

    check()
    assert _internal_count(tiny_server) == internal
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen  # both paths exercised
    _still_serves(tiny_server)


def test_fuzzed_images_get_a_clean_answer(tiny_server):
    internal = _internal_count(tiny_server)
    stub = tiny_server.stub()
    fixed = {name: None for name in ALL_FIELDS}  # every other field fixed at cheap valid values
    fixed.update({"model": MODEL, "width": 32, "height": 32, "num_frames": 1, "num_inference_steps": 1,
                  "output.frame_encoding": pb.FRAME_ENCODING_NONE, "priority": 0, "request_id": "",
                  "timeout_microseconds": 0})
    assert set(fixed) == set(ALL_FIELDS)

    @settings(FUZZ, max_examples=EXAMPLES * 5 // 3)
    @given(image=wild_images)
    def check(image):
        check_answer(stub, {**fixed, "image": image}, {"image"})

    check()
    assert _internal_count(tiny_server) == internal
    _still_serves(tiny_server)


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=[f"{f}-{m}" for f, m in IMAGE_KINDS])
def test_every_image_kind_is_accepted(tiny_server, kind):
    """The valid images the fuzzers draw from really are valid (each format and mode once)."""
    image = _encode(kind[0], kind[1], (24, 16), 1234)
    fields = {name: None for name in ALL_FIELDS}
    fields.update({"model": MODEL, "image": image, "width": 16, "height": 16, "num_frames": 1,
                   "num_inference_steps": 1, "output.frame_encoding": 0, "priority": 0, "request_id": "",
                   "timeout_microseconds": 0})
    assert check_answer(tiny_server.stub(), fields, set()) == "OK"


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1), (7, 40)])
def test_tiny_images_are_invalid_argument(tiny_server, size):
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    fields = {name: None for name in ALL_FIELDS}
    fields.update({"model": MODEL, "image": buffer.getvalue(), "width": 16, "height": 16, "num_frames": 1,
                   "num_inference_steps": 1, "output.frame_encoding": 0, "priority": 0, "request_id": "",
                   "timeout_microseconds": 0})
    assert check_answer(tiny_server.stub(), fields, {"image"}) == "INVALID_ARGUMENT"


@pytest.mark.parametrize("request_id", ["é", "日本"])
def test_non_ascii_request_id_is_invalid_argument(tiny_server, request_id):
    fields = {name: None for name in ALL_FIELDS}
    fields.update({"model": MODEL, "image": sample_png(), "width": 16, "height": 16, "num_frames": 1,
                   "num_inference_steps": 1, "output.frame_encoding": 0, "priority": 0,
                   "request_id": request_id, "timeout_microseconds": 0})
    assert check_answer(tiny_server.stub(), fields, {"request_id"}) == "INVALID_ARGUMENT"
