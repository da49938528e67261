"""Open Inference Protocol (KServe v2) / Triton compatibility, proven with the real tritonclient.

The client is tritonclient[grpc] from PyPI, unmodified, in its own virtual environment (it pins
protobuf<7, the server needs protobuf>=7), run as a subprocess against an in-process server, as an
external user's program would be: tests/integration/triton_client/client.py. The environment is
found through VIDEOGEN_TRITON_PYTHON, else <repo>/.venv-triton/bin/python (`make triton-venv`);
without either the tests are skipped.

Frames that tritonclient receives are compared with the frames the VideoGen API returns for the
same request on the same server (same seed, same parameters): they must be equal.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import google.protobuf
import grpc
import numpy as np
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import ServerThread, collect, raw_frames, request, sample_png, video_bytes, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().parent / "triton_client" / "client.py"
MODEL = "svd-tiny"
SPARE = "spare"  # in the repository, not loaded at start: load_model / unload_model
LABELS = {"model": MODEL, "version": "1"}


def _triton_python() -> str:
    candidates = [os.environ.get("VIDEOGEN_TRITON_PYTHON", ""), str(REPO_ROOT / ".venv-triton" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("no tritonclient environment: set VIDEOGEN_TRITON_PYTHON to a python with "
                "tritonclient[grpc] installed, or run `make triton-venv` (creates .venv-triton)")


@pytest.fixture(scope="module")
def triton_python() -> str:
    return _triton_python()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_source: Path, triton_python: str):
    repo = tmp_path_factory.mktemp("triton-repo")
    shutil.copytree(tiny_model_source, repo / MODEL)
    shutil.copytree(tiny_model_source, repo / SPARE)
    # KIND_AUTO: ModelConfig reports the kind it resolved to (KIND_CPU here, no GPU), as Triton does
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("kind: KIND_CPU", "kind: KIND_AUTO"))
    (repo / SPARE / "config.pbtxt").write_text(
        (tiny_model_source / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{SPARE}"'))
    with ServerThread(repo, model_control_mode="explicit", load_models=(MODEL,)) as s:
        yield s


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run_client(python: str, command: str, **args) -> dict:
    proc = subprocess.run([python, str(CLIENT), command, json.dumps(args)], capture_output=True, text=True,
                          timeout=120, env=_client_env())
    assert proc.returncode == 0, f"client {command} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def videogen_reference(server: ServerThread, **fields):
    """Frames [F, H, W, 3] and MP4 bytes from the VideoGen API for the same request."""
    responses = collect(server.stub(), request(model=MODEL, output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB},
                                               **fields))
    return raw_frames(responses), video_bytes(responses)


def stats_of(statistics: dict, model: str = MODEL) -> dict:
    [row] = [s for s in statistics["model_stats"] if s["name"] == model]
    return row


def duration(row: dict, key: str) -> tuple[int, int]:
    d = row.get("inference_stats", {}).get(key, {})
    return int(d.get("count", 0)), int(d.get("ns", 0))


# -- the protocol definition ------------------------------------------------------------------------


def test_protocol_definition_matches_tritonclient(server, triton_python, tmp_path):
    from google.protobuf import descriptor_pb2
    from inference import grpc_service_pb2, model_config_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (model_config_pb2, grpc_service_pb2):
        mod.DESCRIPTOR.CopyToProto(fds.file.add())
    path = tmp_path / "ours.pb"
    path.write_bytes(fds.SerializeToString())
    out = run_client(triton_python, "descriptors", descriptors=str(path))
    assert out["problems"] == []
    assert out["messages"] >= 30
    assert out["methods"] == sorted(f".inference.GRPCInferenceService/{m}" for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload"))
    # two environments, as a real external client: tritonclient's protobuf<7, the server's >=7
    assert int(out["versions"]["protobuf"].split(".")[0]) < 7
    assert int(google.protobuf.__version__.split(".")[0]) >= 7
    assert out["versions"]["python"] != sys.executable


# -- health, metadata, configuration, repository index -----------------------------------------------


def test_health_metadata_config_and_index(server, triton_python):
    out = run_client(triton_python, "probe", target=server.target, model=MODEL)
    assert out["live"] is True and out["ready"] is True
    assert out["model_ready"] is True and out["model_ready_v1"] is True
    assert out["model_ready_v9"] is False and out["missing_ready"] is False

    meta = out["server_metadata"]
    assert meta["name"] == "videogen" and meta["version"]
    assert set(meta["extensions"]) == {"model_repository", "model_configuration", "schedule_policy",
                                       "statistics", "parameters"}

    mm = out["model_metadata"]
    assert mm["name"] == MODEL and mm["versions"] == ["1"] and mm["platform"] == "svd"
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in mm["inputs"]}
    assert inputs["image"] == ("BYTES", ["1"])
    assert inputs["num_frames"] == ("INT32", ["1"]) and inputs["seed"] == ("INT64", ["1"])
    assert inputs["noise_aug_strength"] == ("FP32", ["1"]) and inputs["size"] == ("INT32", ["2"])
    assert {"width", "height", "num_inference_steps", "fps", "motion_bucket_id", "min_guidance_scale",
            "max_guidance_scale", "guidance", "decode_chunk_size", "video_fps"} <= set(inputs)
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in mm["outputs"]}
    assert outputs == {"frames": ("UINT8", ["-1", "-1", "-1", "3"]), "video": ("BYTES", ["1"])}

    cfg = out["config"]
    assert cfg["name"] == MODEL and cfg["backend"] == "svd"
    assert cfg["decoupled"] is True and cfg["max_batch_size"] == 0
    config_inputs = {name: (dt, dims, optional) for name, dt, dims, optional in cfg["inputs"]}
    assert config_inputs["image"] == ("TYPE_STRING", [1], False)
    assert config_inputs["num_frames"] == ("TYPE_INT32", [1], True)
    assert config_inputs["guidance"] == ("TYPE_FP32", [-1], True)
    assert all(optional for name, (_, _, optional) in config_inputs.items() if name != "image")
    assert cfg["outputs"] == [["frames", "TYPE_UINT8", [-1, -1, -1, 3]], ["video", "TYPE_STRING", [1]]]
    assert cfg["instance_group"] == [[1, "KIND_CPU"]]
    assert cfg["priority_levels"] == 2
    assert cfg["parameters"]["default_width"] == "64" and cfg["parameters"]["dtype"] == "float32"
    assert out["config_json"]["config"]["model_transaction_policy"] == {"decoupled": True}

    index = {(m["name"], m.get("version", "")): m["state"] for m in out["index"]["models"]}
    assert index == {(MODEL, "1"): "READY", (SPARE, ""): "UNAVAILABLE"}
    assert stats_of(out["statistics"])["version"] == "1"


# -- ModelInfer -------------------------------------------------------------------------------------


def test_infer_frames_and_video_equal_videogen(server, triton_python, tmp_path):
    reqs = [
        # conditioning both as input tensors and as request parameters, with the shorthands
        {"id": "a", "inputs": {"num_frames": 3, "num_inference_steps": 2, "seed": 11, "decode_chunk_size": 2,
                               "noise_aug_strength": 0.05, "guidance": [1.0, 2.5]},
         "parameters": {"motion_bucket_id": 100, "size": "64x48", "fps": 6}},
        # only frames requested; priority and timeout as Triton clients send them
        {"id": "b", "inputs": {"num_frames": 2, "num_inference_steps": 1, "seed": 5, "width": 32, "height": 32},
         "outputs": ["frames"], "priority": 1, "timeout": 60_000_000},
        # a level beyond the model's 2 takes the default level, as Triton does (VideoGen calls are refused)
        {"id": "high-priority", "inputs": {"num_frames": 1, "num_inference_steps": 1}, "priority": 3},
        {"id": "bad-input", "inputs": {"num_frame": 2}},
        {"id": "bad-range", "inputs": {"num_frames": 999}},
        {"id": "bad-model", "model": "no-such-model", "inputs": {}},
    ]
    refused = server.metric("videogen_requests_total", model="", outcome="rejected", code="INVALID_ARGUMENT")
    out = run_client(triton_python, "infer", target=server.target, model=MODEL, image=_sample_file(tmp_path),
                     out_dir=str(tmp_path), requests=reqs)["results"]

    a = out["a"]
    assert a["outputs"] == ["frames", "video"] and a["id"] == "a" and a["model_version"] == "1"
    assert a["frames_shape"] == [3, 48, 64, 3] and a["frames_dtype"] == "uint8"
    assert a["parameters"]["seed"] == 11 and a["parameters"]["motion_bucket_id"] == 100
    assert a["parameters"]["max_guidance_scale"] == 2.5 and a["parameters"]["request_id"] == "a"
    frames, video = videogen_reference(server, num_frames=3, num_inference_steps=2, seed=11, decode_chunk_size=2,
                                       noise_aug_strength=0.05, min_guidance_scale=1.0, max_guidance_scale=2.5,
                                       motion_bucket_id=100, width=64, height=48, fps=6)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), frames)
    assert (tmp_path / "a.mp4").read_bytes() == video

    b = out["b"]
    assert b["outputs"] == ["frames"] and b["frames_shape"] == [2, 32, 32, 3] and "video_bytes" not in b
    frames, _ = videogen_reference(server, num_frames=2, num_inference_steps=1, seed=5, width=32, height=32,
                                   priority=1)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), frames)

    assert "status" not in out["high-priority"] and out["high-priority"]["frames_shape"][0] == 1
    assert out["bad-input"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert out["bad-input"]["error"].startswith("num_frame: unknown input")
    assert out["bad-range"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert out["bad-range"]["error"].startswith("num_frames:")
    assert out["bad-model"]["status"] == "StatusCode.NOT_FOUND"
    # counted, though refused before the engine (an unknown tensor: its model not looked up)
    assert server.metric("videogen_requests_total", model="", outcome="rejected", code="INVALID_ARGUMENT") == refused + 1


def _sample_file(tmp_path: Path) -> str:
    path = tmp_path / "sample.png"
    path.write_bytes(sample_png())
    return str(path)


# -- ModelStreamInfer ---------------------------------------------------------------------------------


def test_stream_every_frame_then_final_response(server, triton_python, tmp_path):
    out = run_client(
        triton_python, "stream", target=server.target, model=MODEL, image=_sample_file(tmp_path),
        out_dir=str(tmp_path),
        failing=[{"id": "bad", "inputs": {"num_frames": 999}}],
        requests=[  # different shapes, so they never share a batch: frames equal a solo run exactly
            {"id": "s1", "inputs": {"num_frames": 3, "num_inference_steps": 2, "seed": 21, "decode_chunk_size": 2},
             "outputs": ["frames", "video"]},
            {"id": "s2", "inputs": {"num_frames": 2, "num_inference_steps": 1, "seed": 22}, "outputs": ["frames"]},
        ])
    # the failed request: an error on the stream, which stayed open for the requests after it
    assert len(out["errors"]) == 1 and out["errors"][0]["error"].startswith("num_frames: 999 is outside")
    assert set(out["requests"]) == {"s1", "s2"}

    for rid, n, fields in (("s1", 3, dict(num_frames=3, num_inference_steps=2, seed=21, decode_chunk_size=2)),
                           ("s2", 2, dict(num_frames=2, num_inference_steps=1, seed=22))):
        got = out["requests"][rid]
        assert got["order"] == [*range(n), "final"]  # one response per frame in order, the final last
        assert all(shape == [[48, 64, 3], "uint8"] for shape in got["frames"].values())
        final = got["final"]
        assert final["parameters"]["triton_final_response"] is True
        assert final["parameters"]["seed"] == fields["seed"] and final["parameters"]["num_frames"] == n
        frames, video = videogen_reference(server, **fields)
        streamed = np.stack([np.load(tmp_path / f"{rid}-frame{i}.npy") for i in range(n)])
        np.testing.assert_array_equal(streamed, frames)
        if rid == "s1":
            assert final["outputs"] == ["video"]
            assert (tmp_path / "s1-final.mp4").read_bytes() == video
        else:
            assert final["outputs"] == []


def test_stop_stream_cancels_running_request(server, triton_python, tmp_path):
    cancelled_before = server.metric("videogen_requests_total", outcome="cancelled", **LABELS)
    steps_before = server.metric("videogen_denoise_step_seconds_count", **LABELS)
    args = {"target": server.target, "model": MODEL, "image": _sample_file(tmp_path),
            "long": {"num_frames": 4, "num_inference_steps": 50, "size": [64, 48]}}
    proc = subprocess.Popen([triton_python, str(CLIENT), "cancel", json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_client_env())
    try:
        line = proc.stdout.readline().strip()
        assert line == "sent", proc.stderr.read() if not line else line
        wait_until(lambda: server.metric("videogen_instances_busy", **LABELS) == 1, what="the long request to run")
        stdout, stderr = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    # the request parameter `timeout` (microseconds) is the queue timeout, as in Triton, and its end is
    # Triton's UNAVAILABLE ("Request timeout expired", which Triton clients retry), not DEADLINE_EXCEEDED
    assert out["queued"]["status"] == "StatusCode.UNAVAILABLE", out["queued"]
    assert "result" not in out["stream_callbacks"]
    # stop_stream(cancel_requests=True) cancelled the running generation: recorded and freed
    wait_until(lambda: server.metric("videogen_requests_total", outcome="cancelled", **LABELS)
               == cancelled_before + 1, timeout=10, what="the cancellation to be recorded")
    wait_until(lambda: server.metric("videogen_instances_busy", **LABELS) == 0, timeout=10, what="an idle instance")
    assert server.metric("videogen_inflight_requests", **LABELS) == 0
    assert server.metric("videogen_denoise_step_seconds_count", **LABELS) - steps_before < 50


# -- ModelStatistics --------------------------------------------------------------------------------


def test_statistics_count_success_and_failure(server, triton_python, tmp_path):
    before = stats_of(run_client(triton_python, "statistics", target=server.target, model=MODEL)["statistics"])
    started_ms = int(time.time() * 1000)
    run_client(triton_python, "infer", target=server.target, model=MODEL, image=_sample_file(tmp_path),
               out_dir=str(tmp_path), requests=[
                   {"id": "ok", "inputs": {"num_frames": 2, "num_inference_steps": 1, "seed": 1}},
                   {"id": "fails", "inputs": {"num_frames": 999}}])
    after = stats_of(run_client(triton_python, "statistics", target=server.target)["statistics"])

    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    assert int(after["execution_count"]) == int(before.get("execution_count", 0)) + 1
    # ms since the epoch of the latest request, success or failure: one of this test's (not `> before`,
    # which passed only after another test of the file had run an inference)
    assert started_ms <= int(after["last_inference"]) <= int(time.time() * 1000)
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        (c0, ns0), (c1, ns1) = duration(before, key), duration(after, key)
        assert c1 == c0 + 1, key
        assert ns1 > ns0 or key == "queue", key
    assert duration(after, "fail")[0] == duration(before, "fail")[0] + 1
    # one set of numbers: what the VideoGen API's metrics count is what ModelStatistics counts
    successes = server.metric("videogen_requests_total", outcome="success", **LABELS)
    assert duration(after, "success")[0] == successes


# -- model control ----------------------------------------------------------------------------------


def test_load_and_unload_model(server, triton_python):
    out = run_client(triton_python, "repository", target=server.target, model=SPARE)
    assert out["ready_before"] is False
    assert out["ready_after_load"] is True
    index = {(m["name"], m.get("version", "")): m["state"] for m in out["index_after_load"]["models"]}
    assert index[(SPARE, "1")] == "READY"
    assert stats_of(out["stats_after_load"], SPARE)["version"] == "1"
    assert out["config_override"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert out["ready_after_unload"] is False
    index = {(m["name"], m.get("version", "")): m["state"] for m in out["index_after_unload"]["models"]}
    assert index[(SPARE, "")] == "UNAVAILABLE"
    assert out["missing_metadata"]["status"] == "StatusCode.NOT_FOUND"
    # unloaded: NOT_FOUND as Triton answers a model without an available version (it was UNAVAILABLE,
    # which Triton clients and retry policies take for a passing state)
    assert out["unloaded_metadata"]["status"] == "StatusCode.NOT_FOUND", out["unloaded_metadata"]


# -- in-process checks (no tritonclient needed) ----------------------------------------------------


def test_model_control_needs_explicit_mode_health_and_reflection(tiny_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(tiny_server.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # Triton's code; VideoGen's LoadModel: PERMISSION_DENIED
    # a failed request on a stream: its one response is final and names the request, as Triton's
    responses = list(stub.ModelStreamInfer(iter([kpb.ModelInferRequest(model_name=MODEL, id="q")]), timeout=30))
    assert len(responses) == 1 and responses[0].error_message.startswith("image: required")
    params = responses[0].infer_response.parameters
    assert params["triton_final_response"].bool_param and params["request_id"].string_param == "q"
    # statistics of a version that is not served: NOT_FOUND, as ModelMetadata answers
    for call, req in ((stub.ModelStatistics, kpb.ModelStatisticsRequest(name=MODEL, version="7")),
                      (stub.ModelMetadata, kpb.ModelMetadataRequest(name=MODEL, version="7"))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(tiny_server.channel()).Check(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(tiny_server.channel()).get_services())
    assert "inference.GRPCInferenceService" in services


def test_a_full_queue_is_unavailable_over_the_triton_protocol(make_repo):
    """Triton answers a full queue with UNAVAILABLE ("Exceeds maximum queue size"), which Triton clients
    retry; VideoGen's own API keeps RESOURCE_EXHAUSTED, and metrics record VideoGen's code for both."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from videogen_server.transport.kserve import serialize_bytes

    from ..helpers import Stream, tiny_config

    cfg = tiny_config("m", "dynamic_batching { default_queue_policy { max_queue_size: 1 } }")
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        running = Stream(stub, request(model="m", num_inference_steps=60, num_frames=4))
        running.progressed.wait(10)
        queued = Stream(stub, request(model="m", num_inference_steps=1, num_frames=1))
        queued.accepted.wait(10)
        infer = kpb.ModelInferRequest(model_name="m")
        infer.inputs.add(name="image", datatype="BYTES", shape=[1])
        infer.raw_input_contents.append(serialize_bytes([sample_png()]))
        with pytest.raises(grpc.RpcError) as err:
            kpb_grpc.GRPCInferenceServiceStub(server.channel()).ModelInfer(infer, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "queue is full" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", num_inference_steps=1, num_frames=1))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.metric("videogen_requests_total", model="m", outcome="rejected", code="RESOURCE_EXHAUSTED") == 2
        running.call.cancel()
        running.join(), queued.join()


def test_a_refused_size_names_the_input_the_caller_sent(tiny_server):
    """A width the engine refuses, sent as `size`: the status names `size` (it named `width`, an input
    the caller never sent), on a unary call and on a stream's error response."""
    import struct

    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from videogen_server.transport.kserve import serialize_bytes

    infer = kpb.ModelInferRequest(model_name=MODEL, id="sized")
    infer.inputs.add(name="image", datatype="BYTES", shape=[1])
    infer.inputs.add(name="size", datatype="INT32", shape=[2])
    infer.raw_input_contents.extend([serialize_bytes([sample_png()]), struct.pack("<2i", 36, 32)])
    stub = kpb_grpc.GRPCInferenceServiceStub(tiny_server.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(infer, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("size: 36 is not a multiple of 8"), err.value.details()
    [response] = list(stub.ModelStreamInfer(iter([infer]), timeout=30))
    assert response.error_message.startswith("size: 36 is not a multiple of 8"), response.error_message


def test_a_stream_whose_client_does_not_read_holds_bounded_work(tiny_server, monkeypatch):
    """ModelStreamInfer reads at most STREAM_MAX_IN_FLIGHT requests ahead of their answers and queues at
    most STREAM_MAX_QUEUED responses: a client that sends without reading stops being read (800 000
    unread answers held 1.1 GB). The requests here fail at once (no image), so only the response bound
    and gRPC's own write window hold them back; once the client reads, every one is answered."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc

    from videogen_server.transport.kserve import KServeServicer

    started = []
    stream_one = KServeServicer._stream_one

    def counted(self, req, context):
        started.append(req.id)
        return stream_one(self, req, context)

    monkeypatch.setattr(KServeServicer, "_stream_one", counted)  # counts, then runs unchanged
    sent = 6000
    # the default 64 KiB receive window (no BDP probing, which would grow it to hold every answer)
    with grpc.insecure_channel(tiny_server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([kpb.ModelInferRequest(model_name=MODEL, id=str(i)) for i in range(sent)]), timeout=60)
        time.sleep(3)  # not reading
        read_unanswered = len(started)
        assert read_unanswered < sent / 2, f"{read_unanswered} of {sent} requests were read while nothing was answered"
        answered = [r.infer_response.id for r in call]
    assert len(answered) == sent and len(started) == sent
