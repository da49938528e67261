"""Admission checks: every request field against the model's defaults and limits, and the image.

All of this runs before a request is queued, so a bad request never costs model work. Each
failure is an InvalidRequest naming the request field (proto field names).
"""
from __future__ import annotations

import io
import logging
import math
import re
import secrets
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..errors import InvalidRequest
from ..domain import FrameEncoding, GenerationParams, ResizeMode, ResolvedParams
from .model_config import GenerationDefaults, GenerationLimits

log = logging.getLogger(__name__)

ACCEPTED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_SEED = 2**63 - 1
#: The CLIP preprocessing blurs with reflect padding, which needs a few pixels per side.
MIN_IMAGE_SIDE = 8
#: Scans a JPEG may have. A progressive JPEG has about 10; each scan costs libjpeg a pass over every
#: block, so a few bytes of scan repeated thousands of times held a preprocessing thread for minutes.
MAX_JPEG_SCANS = 100
#: Segments (markers) of a JPEG's first picture: a few dozen in a real one; the walk that counts scans
#: runs in Python, so millions of empty segments would hold a thread for seconds.
MAX_JPEG_SEGMENTS = 10_000
#: The next marker, as libjpeg finds one (`next_marker`): bytes that are not 0xFF, and 0xFF 0x00, are
#: skipped as extraneous data (libjpeg warns and decodes on), 0xFF runs are fill (the last 0xFF of a
#: run is the marker's); group 1 is the marker.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")  # (no `\xff+`: it backtracks, quadratic on a run of 0xFF)
#: In a scan's entropy-coded data, 0xFF is followed by a stuffed 0x00, a restart marker (D0-D7) or fill
#: (another 0xFF): anything else is the next marker.
_JPEG_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


def _jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers of the JPEG's first picture, from its start-of-image to its first end-of-
    image: what Pillow decodes. Walked by segment lengths, so the bytes of metadata (an EXIF thumbnail),
    of scan data and of anything after the picture (a motion photo's MP4, a multi-picture file's other
    pictures) are not read as markers: counting every FF DA of the upload refused motion photos, whose
    video holds the pair every ~64 KiB. Between segments, markers are found as libjpeg finds them, junk
    skipped (a walk that stopped at a stray byte let a scan bomb with one in front through). Stops
    counting above MAX_JPEG_SCANS; the searches run in C, so the walk costs a pass over the bytes."""
    pos, scans, segments = 2, 0, 0
    while scans <= MAX_JPEG_SCANS:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:  # end of the picture
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidRequest("image", f"a JPEG of more than {MAX_JPEG_SEGMENTS} segments")
        if marker in _STANDALONE_MARKERS:
            continue
        pos += int.from_bytes(data[pos:pos + 2], "big")  # (the length counts its own two bytes)
        if marker == 0xDA:
            scans += 1
            after = _JPEG_MARKER_AFTER_SCAN.search(data, pos)  # the scan's data, restarts included
            if after is None:
                break
            pos = after.start()
    return scans


def _int_in(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(field, f"{value} is outside {low}..{high}")
    return value


def _float_in(field: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(field, f"{value} is outside {low}..{high}")
    return value


def resolve_params(p: GenerationParams, d: GenerationDefaults, lim: GenerationLimits) -> ResolvedParams:
    """Apply defaults, check limits; raise InvalidRequest naming the first bad field."""
    width = _int_in("width", d.width if p.width is None else p.width, lim.min_width, lim.max_width)
    height = _int_in("height", d.height if p.height is None else p.height, lim.min_height, lim.max_height)
    for field, value in (("width", width), ("height", height)):
        if value % 8:
            raise InvalidRequest(field, f"{value} is not a multiple of 8")
    num_frames = _int_in("num_frames", d.num_frames if p.num_frames is None else p.num_frames, 1, lim.max_num_frames)
    steps = _int_in("num_inference_steps", d.num_inference_steps if p.num_inference_steps is None else p.num_inference_steps,
                    1, lim.max_num_inference_steps)
    fps = _int_in("fps", d.fps if p.fps is None else p.fps, 1, 240)
    motion = _int_in("motion_bucket_id", d.motion_bucket_id if p.motion_bucket_id is None else p.motion_bucket_id, 0, 1023)
    noise = _float_in("noise_aug_strength", d.noise_aug_strength if p.noise_aug_strength is None else p.noise_aug_strength, 0.0, 10.0)
    gmin = _float_in("min_guidance_scale", d.min_guidance_scale if p.min_guidance_scale is None else p.min_guidance_scale, 0.0, 50.0)
    gmax = _float_in("max_guidance_scale", d.max_guidance_scale if p.max_guidance_scale is None else p.max_guidance_scale, 0.0, 50.0)
    if gmin > gmax:
        raise InvalidRequest("min_guidance_scale", f"{gmin} is above max_guidance_scale {gmax}")
    seed = secrets.randbelow(MAX_SEED) if p.seed is None else _int_in("seed", p.seed, 0, MAX_SEED)
    chunk_default = d.decode_chunk_size or min(num_frames, lim.decode_chunk_limit)
    chunk = chunk_default if p.decode_chunk_size is None else _int_in("decode_chunk_size", p.decode_chunk_size, 1,
                                                                       lim.decode_chunk_limit)
    chunk = min(chunk, num_frames)
    quality = _int_in("output.jpeg_quality", d.jpeg_quality if p.jpeg_quality is None else p.jpeg_quality, 1, 100)
    video_fps = fps if p.video_fps is None else _int_in("output.video_fps", p.video_fps, 1, 240)
    stream_video = True if p.stream_video is None else p.stream_video
    if p.frame_encoding is FrameEncoding.NONE and not stream_video:
        raise InvalidRequest("output.frame_encoding", "NONE with stream_video false would return nothing")
    return ResolvedParams(
        width=width, height=height, num_frames=num_frames, num_inference_steps=steps, fps=fps,
        motion_bucket_id=motion, noise_aug_strength=noise, min_guidance_scale=gmin, max_guidance_scale=gmax,
        seed=seed, decode_chunk_size=chunk, frame_encoding=p.frame_encoding, jpeg_quality=quality,
        stream_video=stream_video, video_fps=video_fps, resize_mode=p.resize_mode,
    )


def _upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: cameras store a portrait photo as landscape pixels plus an
    EXIF orientation tag, which diffusers' `load_image` applies (`ImageOps.exif_transpose`) and so do
    we. An EXIF block too broken to read leaves the pixels as stored rather than refusing the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed metadata is not a malformed image
        log.debug("EXIF orientation unreadable; using the pixels as stored", exc_info=True)
        return img


def fit_image(image: Image.Image, params: ResolvedParams) -> Image.Image:
    """The image the backend resizes to width x height: as it is (STRETCH, diffusers' behaviour), or its
    centred part of the requested aspect (CROP), so a 4:3 photo makes a 16:9 video without squashing."""
    if params.resize_mode is not ResizeMode.CROP:
        return image
    w, h = image.size
    if w * params.height > h * params.width:  # wider than asked: keep the full height
        keep = max(1, min(w, round(h * params.width / params.height)))
        left = (w - keep) // 2
        box = (left, 0, left + keep, h)
    else:  # taller (or equal): keep the full width
        keep = max(1, min(h, round(w * params.height / params.width)))
        top = (h - keep) // 2
        box = (0, top, w, top + keep)
    if keep < MIN_IMAGE_SIDE:
        raise InvalidRequest("resize_mode", f"cropping the {w}x{h} image to {params.width}:{params.height} leaves "
                             f"{keep} pixels across; use stretch")
    return image if box == (0, 0, w, h) else image.crop(box)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Pillow's RGB conversion, except for 16-bit grayscale (PNG), which Pillow opens as integer
    pixels and converts by clipping at 255: all but the darkest tones white. Its high byte is the
    8-bit picture (diffusers' `load_image` keeps the clipped one)."""
    if img.mode.startswith("I;16"):  # I;16, I;16B, I;16L: unsigned 16-bit samples
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L")
    elif img.mode == "I":  # 32-bit integers holding 16-bit samples (older Pillow's 16-bit PNG)
        img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8), "L")
    return img.convert("RGB")


def quiet_decompression_bomb_warnings() -> None:
    """Pillow's `Image.open` warns (DecompressionBombWarning) for an image of 89.5M to 179M pixels before
    `decode_image` can refuse it by its header: a line in the server's log for every size a caller
    sends. The refusal says it all; installed once, at the engine's start-up (a per-call
    catch_warnings would swap the process-wide filters: see `decode_image`)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, lim: GenerationLimits) -> Image.Image:
    """Decode the conditioning image to RGB, refusing oversized payloads and decompression bombs.

    The pixel count is checked from the header before any pixel is decoded. Animated images use
    their first frame; an EXIF orientation is applied (a portrait phone photo stays portrait); RGBA,
    grayscale (8 or 16 bits), palette and CMYK images are converted to RGB.
    """
    if not data:
        raise InvalidRequest("image", "required: encoded PNG, JPEG or WebP bytes")
    if len(data) > lim.max_image_bytes:
        raise InvalidRequest("image", f"{len(data)} bytes exceeds the model's limit of {lim.max_image_bytes}")
    # No warnings.catch_warnings here to make Pillow's DecompressionBombWarning an error: it swaps the
    # process-wide warning filters and hook, and interleaved with another thread's (Inductor records
    # CUDA graphs in one) it left every later warning of the process going to a dead list. Not needed
    # either: max_image_pixels is at most Pillow's warning threshold, and the header check below refuses
    # every image that warns, before a pixel is decoded (Image.open's warning itself is silenced once,
    # by quiet_decompression_bomb_warnings at start-up).
    try:
        img = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_IMAGE_FORMATS))
        w, h = img.size
        if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
            raise InvalidRequest("image", f"{w}x{h} is smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels")
        if w * h > lim.max_image_pixels:
            raise InvalidRequest("image", f"{w}x{h} pixels exceeds the model's limit of {lim.max_image_pixels}")
        # Every JPEG: Pillow calls one with a multi-picture (MPF) segment "MPO", and a scan bomb
        # carrying one was decoded in full
        if data[:2] == b"\xff\xd8" and _jpeg_scans(data) > MAX_JPEG_SCANS:
            raise InvalidRequest("image", f"a JPEG of more than {MAX_JPEG_SCANS} scans")
        img.seek(0)
        img.load()
        rgb = _to_rgb(_upright(img))
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's threshold: refused by Image.open itself
        raise InvalidRequest("image", "too many pixels (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        # no decoder took it: one whose signature says PNG, JPEG or WebP has a damaged or unsupported
        # header (a bad checksum, 12-bit samples), which is not the same news for its sender
        if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise InvalidRequest("image", "cannot be decoded: its header is damaged or of a kind not supported "
                                          "(e.g. a bad checksum, or 12-bit JPEG samples)") from None
        raise InvalidRequest("image", "not a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidRequest("image", f"cannot be decoded ({type(err).__name__})") from None
    return rgb
