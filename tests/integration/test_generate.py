"""Generate end to end over real gRPC on the tiny model: stream shape, parity, parameters, video."""
from __future__ import annotations

import io

import av
import grpc
import numpy as np
import pytest
from PIL import Image

from videogen.v1 import videogen_pb2 as pb

from ..helpers import collect, kinds, raw_frames, request, sample_png, video_bytes, wait_until

RAW = {"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}


def test_stream_order_and_summary(tiny_server):
    responses = collect(tiny_server.stub(), request(num_frames=4, num_inference_steps=3, decode_chunk_size=2, seed=1))
    k = kinds(responses)
    assert k[0] == "accepted" and k[-1] == "summary"
    assert k[1:4] == ["progress"] * 3
    assert [r.progress.step for r in responses[1:4]] == [1, 2, 3]
    assert all(r.progress.num_steps == 3 for r in responses[1:4])
    frames = [r.frame for r in responses if r.WhichOneof("event") == "frame"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [f.chunk_index for f in frames] == [0, 0, 1, 1]  # decode_chunk_size 2
    assert all(f.num_parts == 1 and Image.open(io.BytesIO(f.data)).size == (64, 48) for f in frames)
    # video chunks: the last one flagged and after the last frame, offsets contiguous
    video = [r.video for r in responses if r.WhichOneof("event") == "video"]
    assert k.index("video") > k.index("frame") and len(k) - 1 - k[::-1].index("video") > max(
        i for i, x in enumerate(k) if x == "frame")
    assert video[-1].last and not any(v.last for v in video[:-1])
    assert [v.offset for v in video] == list(np.cumsum([0] + [len(v.data) for v in video[:-1]]))
    s = responses[-1].summary
    acc = responses[0].accepted
    assert s.request_id == acc.request_id and s.num_frames == 4 and s.batch_size == 1
    assert s.total_seconds >= s.denoise_seconds > 0 and s.decode_seconds > 0 and s.first_frame_seconds > 0
    assert s.video_bytes == sum(len(v.data) for v in video) and s.peak_memory_bytes > 0
    assert acc.parameters.seed == 1 and acc.parameters.decode_chunk_size == 2 and acc.model_version == 1


def test_defaults_apply_and_seed_is_reported(tiny_server):
    responses = collect(tiny_server.stub(), request(output={"stream_video": False}))
    p = responses[0].accepted.parameters
    assert (p.width, p.height, p.num_frames, p.num_inference_steps, p.fps, p.motion_bucket_id) == (64, 48, 4, 4, 7, 127)
    assert p.noise_aug_strength == pytest.approx(0.02) and (p.min_guidance_scale, p.max_guidance_scale) == (1.0, 3.0)
    assert p.decode_chunk_size == 2 and p.seed >= 0
    assert "video" not in kinds(responses)
    # an unset seed is drawn at random, not a fixed one (p.seed >= 0 held for 0 too: tests audit)
    again = collect(tiny_server.stub(), request(num_inference_steps=1, num_frames=1, output={"stream_video": False}))
    assert again[0].accepted.parameters.seed != p.seed


class DecodeGate:
    """Holds the `hold_call`-th call of the served pipeline's VAE decoder until `open` (or 30 s): a
    stream whose output waits for the decoder's later calls would wait that out, which `held` says."""

    def __init__(self, server, hold_call: int) -> None:
        import threading

        [runtime] = server.engine.models["svd-tiny"].loaded.values()
        [instance] = runtime.instances
        # the session's server: an earlier test's request has ended
        wait_until(lambda: runtime.idle.is_set() and instance.batch_started is None, timeout=60, what="the shared server idle")
        self.calls = 0
        self.held: list[bool] = []  # for the held call: whether the gate opened before the 30 s ran out
        self.open = threading.Event()

        def hold(module, args):
            self.calls += 1
            if self.calls == hold_call:
                self.held.append(self.open.wait(30))

        self._handle = instance.backend.pipe.vae.decoder.register_forward_pre_hook(hold)

    def __enter__(self) -> "DecodeGate":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.open.set()


def test_frames_are_streamed_before_later_chunks_are_decoded(tiny_server):
    """Each decode chunk's frames go out before the next chunk is decoded: the decoder's second call is
    held until the first frame has arrived (its arrival time before the last frame's held with frames
    sent in one burst at the end; tests audit)."""
    with DecodeGate(tiny_server, hold_call=2) as gate:
        indices = []
        for r in tiny_server.stub().Generate(request(num_frames=8, decode_chunk_size=1, num_inference_steps=1,
                                                     output=RAW), timeout=120):
            if r.WhichOneof("event") == "frame":
                indices.append(r.frame.index)
                gate.open.set()
    assert indices == list(range(8)) and gate.calls == 8  # one decoder call per chunk of 1
    assert gate.held == [True], "the first frame came only after the second chunk was decoded"


PARITY_CASES = [
    dict(seed=7, num_frames=4, num_inference_steps=3, decode_chunk_size=2),
    dict(seed=11, num_frames=3, num_inference_steps=2, width=48, height=32, fps=12, motion_bucket_id=40,
         noise_aug_strength=0.1, decode_chunk_size=3),
    dict(seed=5, num_frames=5, num_inference_steps=4, min_guidance_scale=1.5, max_guidance_scale=2.5,
         decode_chunk_size=2),
    dict(seed=3, num_frames=2, num_inference_steps=2, max_guidance_scale=1.0, decode_chunk_size=1),  # no CFG
]


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model_source):
    """diffusers' own pipeline on the same weights, loaded the same way."""
    import torch
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(tiny_model_source / "1"), dtype=torch.float32,
                                                        use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_frames(pipe, params: dict) -> np.ndarray:
    import torch

    p = dict(params)
    image = Image.open(io.BytesIO(sample_png())).convert("RGB")
    out = pipe(image, height=p.pop("height", 48), width=p.pop("width", 64), generator=torch.Generator().manual_seed(p.pop("seed")),
               output_type="np", **p).frames[0]
    return out


@pytest.mark.parametrize("params", PARITY_CASES, ids=lambda p: f"seed{p['seed']}")
def test_parity_with_diffusers_pipeline(tiny_server, reference_pipeline, params):
    """The 8-bit frames equal diffusers' output converted the same way ((x * 255).round())."""
    responses = collect(tiny_server.stub(), request(**params, output=RAW))
    ours = raw_frames(responses)
    expected = (pipeline_frames(reference_pipeline, params) * 255).round().astype(np.uint8)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def test_one_frame_takes_its_guidance_from_min_guidance_scale(tiny_server, reference_pipeline):
    """A one-frame video's guidance scale is linspace(min, max, 1) = min_guidance_scale (1.0 by
    default): no classifier-free guidance, so the UNet runs one row, not a doubled batch for nothing.
    diffusers fails on this request (it decides by max_guidance_scale when encoding the image and by
    the frames' scales in the loop); the frames are its frames without guidance."""
    params = dict(seed=9, num_frames=1, num_inference_steps=3, decode_chunk_size=1)
    unet = next(iter(tiny_server.engine.models["svd-tiny"].loaded.values())).instances[0].backend.pipe.unet
    rows = []
    hook = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))  # observes only
    try:
        ours = raw_frames(collect(tiny_server.stub(), request(**params, output=RAW)))
    finally:
        hook.remove()
    assert rows == [1, 1, 1]
    expected = (pipeline_frames(reference_pipeline, {**params, "max_guidance_scale": 1.0}) * 255).round()
    np.testing.assert_array_equal(ours, expected.astype(np.uint8))


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_large_photo_matches_the_pipeline(tiny_server, reference_pipeline, monkeypatch):
    """A 2400x1600 image takes the sampled CLIP resize (preprocess.clip_resize, not diffusers' full blur):
    the frames are diffusers' within one 8-bit level (its CLIP input is within ~1e-6 of the pipeline's)."""
    from videogen_server.backends.svd import backend, preprocess

    assert preprocess.blur_cost(1600, 2400) > backend.EXACT_CLIP_RESIZE_MAX_COST  # this test's premise
    calls = []
    real = preprocess.clip_resize
    monkeypatch.setattr(preprocess, "clip_resize", lambda image, *a: calls.append(image.shape) or real(image, *a))
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 200, 2400)[None, :, None] + np.linspace(0, 50, 1600)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 40, (1600, 2400, 3)), 0, 255).astype(np.uint8)
    params = dict(seed=8, num_frames=3, num_inference_steps=3, decode_chunk_size=2)
    ours = raw_frames(collect(tiny_server.stub(), request(image=_png(pixels), **params, output=RAW)))
    import torch

    out = reference_pipeline(Image.fromarray(pixels), height=48, width=64, output_type="np",
                             generator=torch.Generator().manual_seed(8), num_frames=3, num_inference_steps=3,
                             decode_chunk_size=2).frames[0]
    expected = (out * 255).round().astype(np.uint8)
    assert calls == [(1600, 2400, 3)]  # the server's preprocessing took the sampled resize
    assert ours.shape == expected.shape
    assert np.abs(ours.astype(int) - expected).max() <= 1


def test_a_phone_photo_is_used_upright(tiny_server):
    """Cameras store a portrait photo as landscape pixels plus an EXIF orientation tag (6: turn 90 degrees
    clockwise), which diffusers' load_image applies. The server must too: the tagged JPEG gives the frames
    of the same pixels turned upright and sent untagged."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 200, 96)[None, :, None] + np.linspace(0, 40, 64)[:, None, None]
    stored = np.clip(ramp + rng.integers(0, 30, (64, 96, 3)), 0, 255).astype(np.uint8)  # landscape, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns it 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    tagged = buf.getvalue()
    with Image.open(io.BytesIO(tagged)) as im:  # the JPEG's own pixels (lossy), turned as a viewer does
        upright = Image.fromarray(np.asarray(im.convert("RGB"))).transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (64, 96)  # portrait
    params = dict(seed=6, num_frames=2, num_inference_steps=2, width=48, height=64)
    ours = raw_frames(collect(tiny_server.stub(), request(image=tagged, **params, output=RAW)))
    expected = raw_frames(collect(tiny_server.stub(), request(image=_png(np.asarray(upright)), **params, output=RAW)))
    np.testing.assert_array_equal(ours, expected)
    sideways = raw_frames(collect(tiny_server.stub(), request(image=_png(np.asarray(Image.open(io.BytesIO(tagged))
                                                                                   .convert("RGB"))),
                                                              **params, output=RAW)))
    assert not np.array_equal(ours, sideways)


def test_resize_mode_crop_fits_the_aspect_without_squashing(tiny_server):
    """resize_mode CROP centre-crops the image to width:height before the pipeline's resize: the frames of
    a 4:3 image cropped by the server equal those of the same image cropped by the caller (stretch, the
    default, resizes whatever the aspect, as diffusers' pipeline does)."""
    rng = np.random.default_rng(9)
    ramp = np.linspace(0, 200, 120)[None, :, None] + np.linspace(0, 40, 90)[:, None, None]
    photo = np.clip(ramp + rng.integers(0, 30, (90, 120, 3)), 0, 255).astype(np.uint8)  # 4:3
    params = dict(seed=2, num_frames=2, num_inference_steps=2, width=64, height=32)  # 2:1
    responses = collect(tiny_server.stub(), request(image=_png(photo), resize_mode=pb.RESIZE_MODE_CROP,
                                                    **params, output=RAW))
    assert responses[0].accepted.parameters.resize_mode == pb.RESIZE_MODE_CROP
    cropped = photo[15:75]  # 120x60: the full width, the middle 60 rows
    expected = raw_frames(collect(tiny_server.stub(), request(image=_png(cropped), **params, output=RAW)))
    np.testing.assert_array_equal(raw_frames(responses), expected)
    stretched = collect(tiny_server.stub(), request(image=_png(photo), **params, output=RAW))
    assert stretched[0].accepted.parameters.resize_mode == pb.RESIZE_MODE_STRETCH
    assert not np.array_equal(raw_frames(stretched), expected)
    # a crop that would leave a sliver, and a value the proto does not define, are refused naming the field
    for bad, reason in ((dict(image=_png(np.zeros((9, 400, 3), np.uint8)), resize_mode=pb.RESIZE_MODE_CROP,
                              width=32, height=64), "pixels across"),
                        (dict(resize_mode=7), "unknown value")):
        with pytest.raises(grpc.RpcError) as err:
            collect(tiny_server.stub(), request(num_frames=1, num_inference_steps=1, **bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("resize_mode:") and reason in err.value.details()


def test_long_thin_image_is_served(tiny_server, monkeypatch):
    """1 000 000 x 8 pixels is within the pixel limit; diffusers' blur would run a kernel of ~9000 taps over
    all of them (~2e11 multiply-adds, ~40 s of a preprocessing thread here; tens of minutes at 5 000 000 x 8).
    The sampled resize serves it in well under a second."""
    from videogen_server.backends.svd import preprocess

    calls = []
    real = preprocess.clip_resize
    monkeypatch.setattr(preprocess, "clip_resize", lambda image, *a: calls.append(image.shape) or real(image, *a))
    pixels = np.tile(np.arange(256, dtype=np.uint8), (8, 1_000_000 // 256 + 1))[:, :1_000_000, None].repeat(3, 2)
    responses = collect(tiny_server.stub(), request(image=_png(pixels), num_frames=2, num_inference_steps=1,
                                                    output=RAW), timeout=60)
    assert raw_frames(responses).shape == (2, 48, 64, 3) and responses[-1].WhichOneof("event") == "summary"
    assert calls == [(8, 1_000_000, 3)]  # the sampled resize, not diffusers' blur


def _frames(server, **params) -> np.ndarray:
    return raw_frames(collect(server.stub(), request(output={**RAW, "stream_video": False}, **params)))


@pytest.mark.parametrize("change", [
    {"motion_bucket_id": 10}, {"fps": 25}, {"noise_aug_strength": 0.5}, {"seed": 99}, {"min_guidance_scale": 2.0},
    {"max_guidance_scale": 6.0}, {"num_inference_steps": 3},
])
def test_each_parameter_changes_the_output(tiny_server, change):
    base = dict(seed=1, num_frames=3, num_inference_steps=2)
    a = _frames(tiny_server, **base)
    b = _frames(tiny_server, **{**base, **change})
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_same_seed_same_frames_and_size_applies(tiny_server):
    base = dict(seed=4, num_frames=2, num_inference_steps=2)
    np.testing.assert_array_equal(_frames(tiny_server, **base), _frames(tiny_server, **base))
    assert _frames(tiny_server, **base, width=32, height=16).shape == (2, 16, 32, 3)
    assert _frames(tiny_server, **{**base, "num_frames": 5}).shape[0] == 5


def test_decode_chunk_size_groups_frames(tiny_server):
    responses = collect(tiny_server.stub(), request(num_frames=5, num_inference_steps=1, decode_chunk_size=2))
    chunks = [r.frame.chunk_index for r in responses if r.WhichOneof("event") == "frame"]
    assert chunks == [0, 0, 1, 1, 2]


def test_mp4_decodes_to_the_requested_frames_and_fps(tiny_server):
    responses = collect(tiny_server.stub(), request(num_frames=6, num_inference_steps=1, fps=7,
                                                    output={"video_fps": 12, "frame_encoding": pb.FRAME_ENCODING_NONE}))
    assert "frame" not in kinds(responses)
    data = video_bytes(responses)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 12
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(decoded) == 6 and decoded[0].shape == (48, 64, 3)
    assert b"ftyp" in data[:16] and b"moof" in data  # fragmented MP4


def test_mp4_streams_while_later_chunks_decode(tiny_server):
    """The video is not held to the end: fragments of the first chunks go out before the last frames, and
    before the last chunk is decoded (its decoder call held until a fragment has arrived)."""
    with DecodeGate(tiny_server, hold_call=6) as gate:
        responses = []
        for r in tiny_server.stub().Generate(request(num_frames=12, num_inference_steps=1, decode_chunk_size=2),
                                             timeout=120):
            responses.append(r)
            if r.WhichOneof("event") == "video" and b"moof" in r.video.data:
                gate.open.set()
    assert gate.calls == 6 and gate.held == [True], "no fragment came before the last chunk was decoded"
    k = kinds(responses)
    last_frame = max(i for i, x in enumerate(k) if x == "frame")
    early = [r.video for i, r in enumerate(responses) if k[i] == "video" and i < last_frame]
    assert early and b"moof" in b"".join(v.data for v in early), k
    with av.open(io.BytesIO(video_bytes(responses))) as container:
        assert sum(1 for _ in container.decode(video=0)) == 12


def test_jpeg_frames(tiny_server):
    responses = collect(tiny_server.stub(), request(num_frames=2, num_inference_steps=1,
                                                    output={"frame_encoding": pb.FRAME_ENCODING_JPEG, "jpeg_quality": 50}))
    frames = [r.frame for r in responses if r.WhichOneof("event") == "frame"]
    assert [f.index for f in frames] == [0, 1]  # (all() of no frames held too: tests audit)
    assert all(Image.open(io.BytesIO(f.data)).format == "JPEG" for f in frames)
    # jpeg_quality is applied: the same frames at quality 95 are larger
    fine = collect(tiny_server.stub(), request(num_frames=2, num_inference_steps=1,
                                               output={"frame_encoding": pb.FRAME_ENCODING_JPEG, "jpeg_quality": 95}))
    sizes = [len(r.frame.data) for r in fine if r.WhichOneof("event") == "frame"]
    assert len(sizes) == 2 and all(big > len(small.data) for big, small in zip(sizes, frames))


def test_request_id_round_trips(tiny_server):
    stream = tiny_server.stub().Generate(request(num_inference_steps=1, num_frames=1),
                                         metadata=(("x-request-id", "req-42"),))
    responses = list(stream)
    assert dict(stream.initial_metadata())["x-request-id"] == "req-42"
    assert responses[0].accepted.request_id == "req-42" and responses[-1].summary.request_id == "req-42"


def test_list_and_get_model(tiny_server):
    stub = tiny_server.stub()
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["svd-tiny"]
    info = stub.GetModel(pb.GetModelRequest(name="svd-tiny"))
    assert info.state == pb.MODEL_STATE_READY and info.backend == "svd" and info.instances == 1
    assert [v.version for v in info.versions] == [1]
    assert info.defaults.num_frames == 4 and info.limits.max_num_frames == 16 and info.config.name == "svd-tiny"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
