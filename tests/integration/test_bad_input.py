"""Bad requests: a clear status naming the field, before any model work; the server keeps serving."""
from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from videogen.v1 import videogen_pb2 as pb

from ..helpers import collect, raw_frames, request, sample_png


def _png(size, mode="RGB", color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _huge_header_png() -> bytes:
    """A tiny PNG file whose header claims 30000x30000 pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(_png((1, 1)))
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


BAD = [
    ("image", dict(image=b"")),
    ("image", dict(image=b"not an image at all")),
    ("image", dict(image=sample_png()[:200])),  # truncated
    ("image", dict(image=_huge_header_png())),
    ("image", dict(image=b"GIF89a" + b"\0" * 64)),  # not an accepted format
    ("width", dict(width=0)),
    ("width", dict(width=-64)),
    ("width", dict(width=1 << 20)),
    ("width", dict(width=60)),  # not a multiple of 8
    ("height", dict(height=44)),
    ("height", dict(height=-8)),
    ("num_frames", dict(num_frames=0)),
    ("num_frames", dict(num_frames=17)),  # the tiny model's max_num_frames is 16
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_inference_steps", dict(num_inference_steps=51)),
    ("fps", dict(fps=0)),
    ("motion_bucket_id", dict(motion_bucket_id=-1)),
    ("noise_aug_strength", dict(noise_aug_strength=float("nan"))),
    ("min_guidance_scale", dict(min_guidance_scale=4.0, max_guidance_scale=3.0)),
    ("max_guidance_scale", dict(max_guidance_scale=-1.0)),
    ("seed", dict(seed=-5)),
    ("decode_chunk_size", dict(decode_chunk_size=0)),
    ("decode_chunk_size", dict(decode_chunk_size=17)),  # above max_num_frames (= max_decode_chunk_size)
    ("output.jpeg_quality", dict(output={"frame_encoding": pb.FRAME_ENCODING_JPEG, "jpeg_quality": 101})),
    ("output.frame_encoding", dict(output={"frame_encoding": pb.FRAME_ENCODING_NONE, "stream_video": False})),
    ("model", dict(model="")),
    ("model", dict(model="svd-tiny\n2026-11-26 12:00:00 ERROR forged log line")),  # names reach the logs
    ("model", dict(model="m" * 300)),  # and error messages: an 8 MiB name came back as 8 MB of trailers
    ("priority", dict(priority=3)),  # the tiny config has 2 levels
    # refused by the transport before the engine (which counts and logs the rest)
    ("request_id", dict(request_id="a\nb")),
    ("model_version", dict(model_version=-1)),
    ("output.frame_encoding", dict(output={"frame_encoding": 99})),
    ("resize_mode", dict(resize_mode=99)),
]


@pytest.mark.parametrize("field,fields", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(tiny_server, field, fields):
    batches = tiny_server.metric("videogen_batch_size_count")
    refused = tiny_server.metric("videogen_requests_total", outcome="rejected", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as err:
        collect(tiny_server.stub(), request(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: "), err.value.details()
    assert tiny_server.metric("videogen_batch_size_count") == batches  # no model work was done
    # every refusal is counted, wherever it was found (README: the metric counts every Generate)
    assert tiny_server.metric("videogen_requests_total", outcome="rejected", code="INVALID_ARGUMENT") == refused + 1


def test_unknown_model_and_version_are_not_found(tiny_server):
    for fields in (dict(model="no-such-model"), dict(model_version=7)):
        with pytest.raises(grpc.RpcError) as err:
            collect(tiny_server.stub(), request(**fields))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert 'model="no-such-model"' not in tiny_server.scrape()
    with pytest.raises(grpc.RpcError) as err:
        tiny_server.stub().GetModel(pb.GetModelRequest(name="x" * 100_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 100


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_odd_image_modes_are_converted(tiny_server, mode):
    buf = io.BytesIO()
    Image.new(mode, (40, 30)).save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    responses = collect(tiny_server.stub(), request(image=buf.getvalue(), num_frames=1, num_inference_steps=1))
    assert responses[-1].WhichOneof("event") == "summary"


def test_animated_image_uses_the_first_frame(tiny_server):
    buf = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    raw = {"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}
    params = dict(num_frames=1, num_inference_steps=1, seed=4, output=raw)
    animated = raw_frames(collect(tiny_server.stub(), request(image=buf.getvalue(), **params)))
    red, blue = (raw_frames(collect(tiny_server.stub(), request(image=_png((32, 32), color=c), **params)))
                 for c in ("red", "blue"))
    # its first frame's, not another's (only a summary was checked: tests audit)
    assert (animated == red).all() and not (animated == blue).all()


def test_server_serves_after_bad_inputs(tiny_server):
    for fields in BAD[:5]:
        with pytest.raises(grpc.RpcError):
            collect(tiny_server.stub(), request(**fields[1]))
    responses = collect(tiny_server.stub(), request(num_frames=2, num_inference_steps=1))
    assert responses[-1].summary.num_frames == 2


def test_oversized_request_is_refused_by_the_transport(tmp_path, tiny_model_source):
    """Above --max-request-bytes gRPC itself refuses the message (RESOURCE_EXHAUSTED); no crash."""
    import shutil

    from ..helpers import ServerThread

    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / "svd-tiny")
    with ServerThread(repo, max_request_bytes=100_000) as server:
        with pytest.raises(grpc.RpcError) as err:
            collect(server.stub(), request(image=b"\x89PNG" + b"\0" * 200_000))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert collect(server.stub(), request(num_frames=1, num_inference_steps=1))[-1].WhichOneof("event") == "summary"
