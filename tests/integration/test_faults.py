"""Fault injection: device OOM and backend errors end one request; drain on SIGTERM; bad weights."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, Stream, collect, port_answers, request, tiny_config, wait_until

SHORT = dict(num_inference_steps=3, num_frames=2, output={"stream_video": False})


def faulty(kind: str) -> str:
    return tiny_config("m", parameters=TINY_PARAMETERS + f'parameters {{ key: "fault_injection" '
                                                         f'value {{ string_value: "{kind}@2:seed=666" }} }}')


def test_out_of_memory_ends_only_that_request(make_repo):
    with ServerThread(make_repo({"m": faulty("oom")})) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", seed=666, **SHORT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of device memory" in err.value.details()
        # the instance serves the next request, and is idle afterwards
        assert collect(stub, request(model="m", seed=1, **SHORT))[-1].summary.num_frames == 2
        assert server.metric("videogen_requests_total", model="m", outcome="error", code="RESOURCE_EXHAUSTED") == 1
        assert server.metric("videogen_instances_busy", model="m") == 0
        assert server.metric("videogen_inflight_requests", model="m") == 0


def test_backend_error_is_internal_with_a_generic_message(make_repo, caplog):
    with ServerThread(make_repo({"m": faulty("error")})) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", seed=666, **SHORT))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "injected" not in err.value.details() and "Traceback" not in err.value.details()
        assert "injected error at step 2" in caplog.text  # the traceback is in the server log
        assert collect(stub, request(model="m", seed=2, **SHORT))[-1].summary.num_frames == 2


def test_an_instance_lost_for_good_is_told_until_a_reload_restores_it(make_repo):
    """A CUDA error that leaves the device unusable (an illegal address, ECC) stops its instance for good.
    Its version serves on the others, but that capacity was lost silently: GetModel still counted it,
    and no metric or alert said so (a black-box review took 3 instances down to 1 unnoticed). Injected
    here as the RuntimeError text torch raises for it (no GPU on this machine)."""
    cfg = tiny_config("m", "instance_group [ { count: 2, kind: KIND_CPU } ]", parameters=TINY_PARAMETERS + (
        'parameters { key: "fault_injection" value { string_value: "lost@2:seed=666" } }'))
    with ServerThread(make_repo({"m": cfg}), model_control_mode="explicit", load_models=("m",)) as server:
        stub = server.stub()
        assert server.metric("videogen_instances_lost", model="m", version="1") == 0  # exported from the start
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", seed=666, **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "instance failed" in err.value.details()
        assert server.metric("videogen_instances_lost", model="m", version="1") == 1
        info = stub.GetModel(pb.GetModelRequest(name="m"))
        assert info.instances == 1 and info.state == pb.MODEL_STATE_READY
        assert "1 of 2 instances stopped for good" in info.versions[0].reason
        health = health_pb2_grpc.HealthStub(server.channel()).Check(
            health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/m"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # the other instance serves
        for seed in (1, 2):
            assert collect(stub, request(model="m", seed=seed, **SHORT))[-1].summary.num_frames == 2
        stub.LoadModel(pb.LoadModelRequest(name="m"))  # a reload brings them back
        info = stub.GetModel(pb.GetModelRequest(name="m"))
        assert info.instances == 2 and info.versions[0].reason == ""
        assert server.metric("videogen_instances_lost", model="m", version="1") == 0


def test_an_instance_that_stalls_is_retired_and_a_reload_restores_it(make_repo, caplog):
    """A backend call that does not return (a hung kernel, a driver wait: injected as `hang@2`, which
    sends nothing and takes no step) held its request and its instance for good, with the queue behind
    it, and liveness stayed green (audit). After --instance-stall-seconds without progress the instance
    is retired: its request ends UNAVAILABLE, the version serves on the other instance, and the lost
    one is told until a reload; its thread, which a reload cannot free, is told until it returns. A
    request longer than the limit whose steps come within it runs on. A reload while an instance hangs
    is not held by it (a review found the retiring version's stop waiting for its thread for good)."""
    limit = 3.0  # (above the test process's longest garbage-collector pause: it stops every thread)
    cfg = tiny_config("m", "instance_group [ { count: 2, kind: KIND_CPU } ]", parameters=TINY_PARAMETERS + (
        'parameters { key: "fault_injection" value { string_value: "hang@2:seed=666" } }'))
    labels = {"model": "m", "version": "1"}
    with ServerThread(make_repo({"m": cfg}), model_control_mode="explicit", load_models=("m",),
                      instance_stall_seconds=limit, unload_timeout_seconds=1.0) as server:
        stub = server.stub()
        steps, took = 60, 0.0  # ~8 s on a 2-core machine; more steps where a run is faster than the limit
        while took <= limit:
            started = time.monotonic()
            long = collect(stub, request(model="m", seed=1, num_inference_steps=steps, num_frames=2,
                                         output={"stream_video": False}))
            assert long[-1].summary.num_frames == 2
            took, steps = time.monotonic() - started, steps * 2
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="m", seed=666, request_id="stalled-1", **SHORT))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no progress" in err.value.details() and "retired" in err.value.details()
        assert "no progress for" in caplog.text and "stalled-1" in caplog.text
        assert server.metric("videogen_instances_lost", **labels) == 1
        assert server.metric("videogen_instances_stuck", **labels) == 1
        assert server.metric("videogen_instances_busy", **labels) == 0  # (its thread is no longer busy serving)
        info = stub.GetModel(pb.GetModelRequest(name="m"))
        assert info.instances == 1 and info.state == pb.MODEL_STATE_READY
        assert "1 of 2 instances stopped for good" in info.versions[0].reason
        for seed in (1, 2):  # the other instance serves
            assert collect(stub, request(model="m", seed=seed, **SHORT))[-1].summary.num_frames == 2
        # the other hangs too; a reload meanwhile ends its request (the unload's timeout), then waits for
        # the retiring version's instances: for the hung one, until the watchdog retires it
        hung = Stream(stub, request(model="m", seed=666, request_id="stalled-2", **SHORT))
        assert hung.progressed.wait(30)
        stub.LoadModel(pb.LoadModelRequest(name="m"), timeout=60)
        assert hung.join().code() == grpc.StatusCode.UNAVAILABLE
        info = stub.GetModel(pb.GetModelRequest(name="m"))
        assert info.instances == 2 and info.versions[0].reason == ""
        assert server.metric("videogen_instances_lost", **labels) == 0
        assert server.metric("videogen_instances_stuck", **labels) == 2  # (both threads still wait)
        assert server.metric("videogen_instances_busy", **labels) == 0
        assert collect(stub, request(model="m", seed=3, **SHORT))[-1].summary.num_frames == 2


def test_unexpected_errors_in_model_listing_are_internal_with_a_generic_message(make_repo, monkeypatch):
    """ListModels and GetModel, as every call: a bug's exception text never reaches the caller (it was
    UNKNOWN with the exception's class and message). The fault is injected into the engine's method."""
    from videogen.v1 import videogen_pb2 as pb

    with ServerThread(make_repo({"m": None})) as server:
        def broken(*args, **kwargs):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(server.engine, "list_models", broken)
        monkeypatch.setattr(server.engine, "status", broken)
        stub = server.stub()
        for call in (lambda: stub.ListModels(pb.ListModelsRequest()), lambda: stub.GetModel(pb.GetModelRequest(name="m"))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INTERNAL and "secret" not in err.value.details()


def test_pickle_weights_are_refused_and_other_models_serve(make_repo):
    import torch
    from safetensors.torch import load_file

    repo = make_repo({"good": tiny_config("good"), "pickled": tiny_config("pickled")})
    unet = repo / "pickled" / "1" / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), unet / "diffusion_pytorch_model.bin")
    weights.unlink()
    with ServerThread(repo) as server:
        stub = server.stub()
        info = stub.GetModel(pb.GetModelRequest(name="pickled"))
        assert info.state == pb.MODEL_STATE_FAILED and "safetensors" in info.versions[0].reason.lower()
        assert collect(stub, request(model="good", **SHORT))[-1].summary.num_frames == 2


def test_load_never_leaves_the_repository(make_repo):
    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="explicit", load_models=("a",)) as server:
        for name in ("../a", "a/../a", "/etc", "..", "a/1"):
            with pytest.raises(grpc.RpcError) as err:
                server.stub().LoadModel(pb.LoadModelRequest(name=name))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, name


def test_sigterm_drains_then_exits_zero(tmp_path, tiny_model_source):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / "svd-tiny")
    ports = tmp_path / "ports"
    proc = subprocess.Popen([sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo),
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--port-file", str(ports),
                             "--cpu-threads", "1", "--drain-grace-seconds", "20", "--health-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not ports.exists() or not ports.read_text().strip():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        port, _, health_port = ports.read_text().split()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        probes = grpc.insecure_channel(f"127.0.0.1:{health_port}")  # what the orchestrator's probes read
        health = health_pb2_grpc.HealthStub(probes)
        stub = pb_stub(channel)
        # ~5 s of work: the server must still be draining it when the checks below reach it, even after a ~2 s
        # pause of this test process's garbage collector (tests/gc_pauses.py); the server is not paused
        running = Stream(stub, request(num_inference_steps=40, num_frames=4))
        running.progressed.wait(20)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # a second of lame duck (still serving), then the main port closed (GOAWAY)
        wait_until(lambda: not port_answers(f"127.0.0.1:{port}"), 10, "the gRPC port's close")
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(num_inference_steps=1, num_frames=1))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.join(30).summary.num_frames == 4  # the in-flight request finished
        assert proc.wait(30) == 0
        channel.close(), probes.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pb_stub(channel):
    from videogen.v1 import videogen_pb2_grpc

    return videogen_pb2_grpc.VideoGenStub(channel)


def test_a_model_folder_linking_outside_the_repository_is_not_served(make_repo, tmp_path):
    outside = make_repo({"elsewhere": tiny_config("elsewhere")})
    repo = tmp_path / "repo2"
    repo.mkdir()
    (repo / "elsewhere").symlink_to(outside / "elsewhere")
    from videogen_server.engine import repository

    assert repository.scan((repo,)) == {}


def test_a_model_folder_whose_name_no_call_could_carry_is_not_served(tmp_path):
    """Model names are at most 256 printable characters in every call; a folder named otherwise is left
    out of the repository (it failed the server's start-up, whose loads check the name)."""
    from videogen_server.engine import repository

    for name in ("ok", "line\nbreak", "tab\there"):  # (folder names are at most 255 bytes anyway)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name[:8]}"\nbackend: "svd"\n')
    assert list(repository.scan((tmp_path,))) == ["ok"]


def test_out_of_memory_in_a_batch_fails_only_the_request_that_does_not_fit(make_repo):
    """The batch runs out of memory; its requests run again one by one: the one that does not fit
    alone gets RESOURCE_EXHAUSTED, the other completes, streaming each step once."""
    # a 10 s delay costs nothing (the second request ends the wait: preferred_batch_size) and keeps the pair
    # one batch across a ~2 s pause of this process's garbage collector between them (tests/gc_pauses.py)
    cfg = tiny_config("m", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 10000000 "
                           "preferred_batch_size: [2] }",
                      parameters=TINY_PARAMETERS + 'parameters { key: "fault_injection" '
                                                   'value { string_value: "oom@2:seed=666" } }')
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        bad = Stream(stub, request(model="m", seed=666, **SHORT))
        good = Stream(stub, request(model="m", seed=1, **SHORT))
        bad.join(), good.join()
        assert bad.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        steps = [r.progress.step for r in good.responses if r.HasField("progress")]
        assert steps == [1, 2, 3]
        assert good.summary.num_frames == 2 and good.summary.batch_size == 1  # it finished on its own
        # the scheduler formed one batch of 2; the re-runs happened inside it, and are counted
        assert server.metric("videogen_batch_size_count", model="m") == 1
        assert server.metric("videogen_batch_size_sum", model="m") == 2
        assert server.metric("videogen_batches_split_total", model="m", version="1", instance="0") == 1


def test_a_failed_batch_gives_each_request_an_error_of_its_own(make_repo, monkeypatch, caplog):
    """One backend error fails a batch of 2: each request gets the error's type and message in an object
    of its own, without the instance thread's traceback (logged once, there). One object raised in every
    request's generator chained each raise's frames onto it, so each request kept the others' frames,
    and clearing it at one call's end took the traceback from the others."""
    from videogen_server.engine.request import EngineRequest

    cfg = tiny_config("m", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 10000000 "
                           "preferred_batch_size: [2] }",
                      parameters=TINY_PARAMETERS + 'parameters { key: "fault_injection" '
                                                   'value { string_value: "error@2:seed=666" } }')
    errors = []
    handed = EngineRequest.error

    def record(self, exc):
        errors.append(exc)
        handed(self, exc)

    monkeypatch.setattr(EngineRequest, "error", record)
    with ServerThread(make_repo({"m": cfg})) as server:
        stub = server.stub()
        bad = Stream(stub, request(model="m", seed=666, **SHORT))
        other = Stream(stub, request(model="m", seed=1, **SHORT))
        bad.join(), other.join()
        assert bad.code() == other.code() == grpc.StatusCode.INTERNAL
        assert server.metric("videogen_batch_size_sum", model="m") == 2  # one batch of both
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert type(errors[0]) is type(errors[1]) is RuntimeError
    assert errors[0].args == errors[1].args and "injected error at step 2" in str(errors[0])
    assert "injected error at step 2" in caplog.text  # the instance's log has the traceback
