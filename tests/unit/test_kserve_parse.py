"""Reading Open Inference Protocol requests (transport/kserve.py) without a server or tritonclient."""
from __future__ import annotations

import struct

import pytest
from inference import grpc_service_pb2 as kpb

from videogen_server.domain import FrameEncoding, ResizeMode
from videogen_server.errors import InvalidRequest
from videogen_server.transport.kserve import parse_infer_request, serialize_bytes

PNG = b"\x89PNG fake"


def make(raw: bool = True, **tensors) -> kpb.ModelInferRequest:
    """A request with `image` and typed tensors: name=(datatype, values)."""
    req = kpb.ModelInferRequest(model_name="m")
    req.inputs.add(name="image", datatype="BYTES", shape=[1])
    if raw:
        req.raw_input_contents.append(serialize_bytes([PNG]))
    else:
        req.inputs[0].contents.bytes_contents.append(PNG)
    fmt = {"INT32": "i", "INT64": "q", "FP32": "f", "FP64": "d", "UINT8": "B"}
    for name, (dt, values) in tensors.items():
        t = req.inputs.add(name=name, datatype=dt, shape=[len(values)])
        if raw:
            req.raw_input_contents.append(struct.pack(f"<{len(values)}{fmt[dt]}", *values))
        else:
            field = {"INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents",
                     "FP64": "fp64_contents", "UINT8": "uint_contents"}[dt]
            getattr(t.contents, field).extend(values)
    return req


def parse(req: kpb.ModelInferRequest):
    return parse_infer_request(req, request_id="r", deadline_s=None)


@pytest.mark.parametrize("raw", [True, False])
def test_inputs_raw_or_typed_contents(raw):
    got = parse(make(raw, num_frames=("INT32", [3]), seed=("INT64", [2**40]), noise_aug_strength=("FP64", [0.05]),
                     size=("INT32", [64, 48]), guidance=("FP32", [1.0, 2.5])))
    p = got.call.params
    assert got.call.image == PNG and got.call.model == "m" and got.call.model_version is None
    assert (p.num_frames, p.seed, p.width, p.height) == (3, 2**40, 64, 48)
    assert p.noise_aug_strength == struct.unpack("<f", struct.pack("<f", 0.05))[0]  # float32, as VideoGen
    assert (p.min_guidance_scale, p.max_guidance_scale) == (1.0, 2.5)
    assert got.outputs == ("frames", "video")
    assert p.frame_encoding is FrameEncoding.RAW_RGB and p.stream_video is True


def test_parameters_priority_timeout_and_outputs():
    req = make()
    req.model_version = "2"
    req.parameters["priority"].uint64_param = 1
    req.parameters["timeout"].int64_param = 250_000
    req.parameters["size"].string_param = "32x16"
    req.parameters["guidance"].double_param = 2.0
    req.parameters["num_inference_steps"].string_param = "3"
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    req.parameters["resize_mode"].string_param = "crop"
    req.outputs.add(name="video")
    got = parse(req)
    c, p = got.call, got.call.params
    assert (c.model_version, c.priority, c.timeout_s) == (2, 1, 0.25)
    assert c.priority_falls_back  # Triton's rule: a level outside the model's takes the default
    assert (p.width, p.height, p.num_inference_steps) == (32, 16, 3)
    assert p.resize_mode is ResizeMode.CROP
    assert (p.min_guidance_scale, p.max_guidance_scale) == (2.0, 2.0)
    assert got.outputs == ("video",) and p.frame_encoding is FrameEncoding.NONE and p.stream_video is True


def setp(key: str, kind: str, value):
    return lambda r: setattr(r.parameters[key], kind, value)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: (r.inputs.add(name="nope", datatype="INT32", shape=[1]), r.raw_input_contents.append(b"\0" * 4)),
     "nope"),
    (lambda r: r.raw_input_contents.append(b""), "raw_input_contents"),
    (setp("nope", "int64_param", 1), "nope"),
    (setp("num_frames", "double_param", 2.5), "num_frames"),
    (setp("seed", "bool_param", True), "seed"),
    (setp("sequence_id", "int64_param", 7), "sequence_id"),
    (setp("priority", "int64_param", -1), "priority"),
    (lambda r: r.outputs.add(name="latents"), "outputs"),
    (lambda r: setattr(r, "model_version", "latest"), "model_version"),
    (lambda r: setattr(r, "model_version", "²"), "model_version"),
    (setp("resize_mode", "string_param", "fill"), "resize_mode"),  # isdigit() alone takes it (was INTERNAL)
    # the shared-memory extension is not offered: refused, not read from or written to the wrong place
    (lambda r: setattr(r.inputs[0].parameters["shared_memory_region"], "string_param", "in0"), "image"),
    (lambda r: setattr(r.outputs.add(name="frames").parameters["shared_memory_region"], "string_param", "out0"),
     "frames"),
])
def test_bad_requests_name_the_field(mutate, field):
    req = make(num_frames=("INT32", [2]))
    mutate(req)
    with pytest.raises(InvalidRequest) as err:
        parse(req)
    assert err.value.field == field


def test_conflicts_and_shapes():
    req = make(num_frames=("INT32", [2]))
    req.parameters["num_frames"].int64_param = 3
    with pytest.raises(InvalidRequest, match="both as an input tensor and as a request parameter"):
        parse(req)
    with pytest.raises(InvalidRequest, match="sets width"):
        parse(make(width=("INT32", [64]), size=("INT32", [64, 48])))
    with pytest.raises(InvalidRequest, match="single value"):
        parse(make(num_frames=("INT32", [2, 3])))
    # a float tensor for an integer input: refused by its datatype (a seed sent as FP32 was rounded to
    # float32: 123456789 ran as 123456792; audit)
    for value in (2.5, 123456789.0):
        with pytest.raises(InvalidRequest, match="must be an integer tensor .INT32 .1.., not FP32"):
            parse(make(num_frames=("FP32", [value])))
    with pytest.raises(InvalidRequest, match="must be an integer tensor .INT64 .1.., not FP64"):
        parse(make(seed=("FP64", [123456789.0])))
    with pytest.raises(InvalidRequest, match="image: required"):
        parse(kpb.ModelInferRequest(model_name="m"))
    truncated = make()
    truncated.raw_input_contents[0] = struct.pack("<I", 100) + b"short"
    with pytest.raises(InvalidRequest, match="runs past the end"):
        parse(truncated)
    wrong_size = make(num_frames=("INT32", [2]))
    wrong_size.raw_input_contents[1] = b"\x00" * 3
    with pytest.raises(InvalidRequest, match="raw bytes do not hold"):
        parse(wrong_size)
    as_pixels = make()
    as_pixels.inputs[0].datatype = "UINT8"
    as_pixels.raw_input_contents[0] = b"\x00"
    with pytest.raises(InvalidRequest, match="must be BYTES"):
        parse(as_pixels)
    # the file's bytes as UINT8 [N]: told what the image must be, not that it has too many elements
    as_pixels.inputs[0].shape[:] = [6195]
    as_pixels.raw_input_contents[0] = b"\x00" * 6195
    with pytest.raises(InvalidRequest, match="must be BYTES"):
        parse(as_pixels)
    # data in two places (raw and typed), or typed in another datatype's field: refused, not ignored
    mixed = make(num_frames=("INT32", [2]))
    mixed.inputs[1].contents.int_contents.append(3)
    with pytest.raises(InvalidRequest, match="num_frames: contents .int_contents. must not be given with raw"):
        parse(mixed)
    stray = make(False, width=("INT32", [32]))
    stray.inputs[1].contents.int64_contents.append(64)
    with pytest.raises(InvalidRequest, match="width: contents field int64_contents does not hold INT32 data"):
        parse(stray)
    # a datatype the protocol has not: named as such (its contents field was blamed; review)
    unknown = make(False, seed=("INT64", [7]))
    unknown.inputs[1].datatype = "FOO"
    with pytest.raises(InvalidRequest, match="seed: datatype 'FOO' is not one of the protocol's: BOOL, UINT8"):
        parse(unknown)


def test_model_config_is_one_triton_would_accept(tmp_path):
    """The server batches requests itself, so ModelConfig reports max_batch_size 0: beside it, Triton
    refuses preferred batch sizes; and the queue bound reported is the one enforced (the server's
    --max-queue-size when config.pbtxt sets none), not 0 (= unbounded to a Triton reader)."""
    from videogen_server.engine.repository import read_settings
    from videogen_server.transport.kserve import model_config_to_pb

    from ..helpers import tiny_config

    text = tiny_config("m", "max_batch_size: 2\ndynamic_batching { preferred_batch_size: [ 2 ] priority_levels: 2 "
                            "default_priority_level: 2 }")
    text += '\nparameters { key: "default_num_frames" value { string_value: "4" } }'  # no model files here
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    cfg = model_config_to_pb(read_settings(tmp_path / "m", default_max_queue_size=37))
    assert cfg.max_batch_size == 0 and list(cfg.dynamic_batching.preferred_batch_size) == []
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 37
    assert cfg.dynamic_batching.priority_levels == 2 and cfg.model_transaction_policy.decoupled


def test_version_folders_are_ascii_numbers(tmp_path):
    from videogen_server.engine.repository import versions_on_disk

    for name in ("1", "3", "²", "x", "0"):
        (tmp_path / name).mkdir()
    assert versions_on_disk(tmp_path) == [1, 3]


def test_oversized_tensors_are_refused_before_they_are_unpacked(monkeypatch):
    """Every input takes one or two values; a tensor declaring or holding millions is refused before its
    data becomes Python objects (a 60 MB UINT16 tensor was a ~1.5 GB list, built on the event loop)."""
    import videogen_server.transport.kserve as kserve

    unpacked = []
    real_unpack = struct.unpack
    monkeypatch.setattr(kserve.struct, "unpack", lambda fmt, data: unpacked.append(fmt) or real_unpack(fmt, data))
    big = make()
    big.inputs.add(name="width", datatype="UINT16", shape=[3_000_000])
    big.raw_input_contents.append(bytes(6_000_000))
    typed = make(raw=False)
    typed.inputs.add(name="width", datatype="INT32", shape=[1]).contents.int_contents.extend(range(100_000))
    many_bytes = kpb.ModelInferRequest(model_name="m")
    many_bytes.inputs.add(name="image", datatype="BYTES", shape=[1])
    many_bytes.raw_input_contents.append(serialize_bytes([b""] * 100_000))
    for req, count in ((big, "3000000"), (typed, "100000"), (many_bytes, "17")):
        with pytest.raises(InvalidRequest) as err:
            parse(req)
        assert err.value.field in ("width", "image") and err.value.reason.startswith(f"{count} elements"), err.value
    assert unpacked == []


def test_a_value_set_through_size_or_guidance_is_named_so():
    """The engine's checks name width, height and the guidance scales; a caller who sent `size` or
    `guidance` is told that name (it was told `width`, an input it never sent)."""
    from videogen_server.transport.status import named_as

    got = parse(make(size=("INT32", [36, 48]), guidance=("FP32", [5.0, 1.0])))
    assert named_as(InvalidRequest("width", "36 is not a multiple of 8"), got.fields).field == "size"
    assert named_as(InvalidRequest("min_guidance_scale", "above max"), got.fields).field == "guidance"
    assert named_as(InvalidRequest("model", "x"), got.fields).field == "model_name"
    plain = parse(make(width=("INT32", [36])))
    assert named_as(InvalidRequest("width", "36 is not a multiple of 8"), plain.fields).field == "width"


def test_caller_strings_and_names_are_bounded_before_any_work():
    """A 32 MiB `guidance` string was split and converted on the event loop (~11 s during which every
    call on the port waited, +900 MiB), and a name holding a newline reached the text log and forged
    a line (security audit): strings are at most MAX_PARAMETER_CHARS, names short and printable."""
    from videogen_server.transport.kserve import MAX_PARAMETER_CHARS

    long = make()
    long.parameters["guidance"].string_param = "1," * 1_000_000
    with pytest.raises(InvalidRequest) as err:
        parse(long)
    assert err.value.field == "guidance" and f"at most {MAX_PARAMETER_CHARS}" in err.value.reason
    forged = make()
    forged.parameters["x\n2026-01-01 INFO videogen.requests: request admin success OK"].int64_param = 1
    with pytest.raises(InvalidRequest) as err:
        parse(forged)
    assert err.value.field == "parameters" and "\n" not in err.value.message
    named = make()
    named.inputs.add(name="i" * 5000, datatype="INT32", shape=[1]).contents.int_contents.append(1)
    named.raw_input_contents[:] = []
    named.inputs[0].contents.bytes_contents.append(PNG)
    with pytest.raises(InvalidRequest) as err:
        parse(named)
    assert err.value.field == "inputs[1].name" and len(err.value.message) < 200

