"""Model control mode `poll`: changed models reload, new ones load, removed ones unload."""
from __future__ import annotations

import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, collect, request, tiny_config, wait_until


def test_poll_reloads_adds_and_removes_models(make_repo):
    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.3) as server:
        stub = server.stub()

        def defaults_steps(name):
            return stub.GetModel(pb.GetModelRequest(name=name)).defaults.num_inference_steps

        assert defaults_steps("a") == 2
        # a changed config reloads the model
        (repo / "a" / "config.pbtxt").write_text(tiny_config("a", parameters=TINY_PARAMETERS.replace(
            'key: "default_num_inference_steps" value { string_value: "2" }',
            'key: "default_num_inference_steps" value { string_value: "3" }')))
        wait_until(lambda: defaults_steps("a") == 3)
        assert len([r for r in collect(stub, request(model="a", num_frames=1)) if r.HasField("progress")]) == 3
        # a new model folder is loaded
        shutil.copytree(repo / "a" / "1", repo / "b" / "1")
        (repo / "b" / "config.pbtxt").write_text(tiny_config("b"))
        wait_until(lambda: any(m.name == "b" and m.state == pb.MODEL_STATE_READY
                             for m in stub.ListModels(pb.ListModelsRequest()).models))
        assert collect(stub, request(model="b", num_frames=1, num_inference_steps=1))[-1].HasField("summary")
        health = health_pb2_grpc.HealthStub(server.channel())
        watch = health.Watch(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/b"), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # a removed one is unloaded and forgotten
        shutil.rmtree(repo / "b")
        wait_until(lambda: "b" not in [m.name for m in stub.ListModels(pb.ListModelsRequest()).models])
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="b", num_frames=1, num_inference_steps=1))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # its health name too (it stayed NOT_SERVING for good, and listed: API audit), as a name never known
        seen = [next(watch).status]  # (the watch's own deadline bounds the wait)
        while seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:  # while it unloads
            seen.append(next(watch).status)
        assert seen[-1] == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, seen
        watch.cancel()
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen/b"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = health.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert "videogen.v1.VideoGen/a" in listed and "videogen.v1.VideoGen/b" not in listed


def _series(server, name: str, **labels: str) -> list[str]:
    """The label sets of `name`'s samples that include `labels` (present at 0 included)."""
    from ..helpers import _LABEL, _SAMPLE

    found = []
    for line in server.scrape().splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name and all(dict(_LABEL.findall(m.group(2) or "")).get(k) == v
                                            for k, v in labels.items()):
            found.append(m.group(2))
    return found


def test_model_ready_follows_rollouts_failures_and_unloads(make_repo):
    """videogen_model_ready is what the not-ready alert reads: a version retired by a rollout or an unload
    takes its gauges along (a 0 left behind paged for good), a version or a model that fails to load
    shows 0 (it showed nothing), and the outcomes the alerts count start at 0 (increase() misses a
    series' first event)."""
    repo = make_repo({"a": tiny_config("a", "version_policy: { latest: { num_versions: 1 } }")})
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.3) as server:
        stub = server.stub()
        assert server.metric("videogen_model_ready", model="a", version="1") == 1
        assert _series(server, "videogen_requests_total", model="a", version="1", outcome="error",
                       code="RESOURCE_EXHAUSTED")
        collect(stub, request(model="a", num_frames=1, num_inference_steps=1))
        assert _series(server, "videogen_request_peak_memory_bytes", model="a", version="1")
        # a rollout: version 2 replaces 1
        shutil.copytree(repo / "a" / "1", repo / "a" / ".v2")
        (repo / "a" / ".v2").rename(repo / "a" / "2")
        wait_until(lambda: server.metric("videogen_model_ready", model="a", version="2") == 1)
        wait_until(lambda: not _series(server, "videogen_model_ready", model="a", version="1"))
        for gauge in ("videogen_queue_depth", "videogen_inflight_requests", "videogen_request_peak_memory_bytes"):
            assert not _series(server, gauge, model="a", version="1"), gauge
        assert _series(server, "videogen_requests_total", model="a", version="1")  # what it did stays counted
        # a failed rollout (a broken version 3 under `latest: 1`): version 2 keeps serving, 3 shows 0;
        # rolled back (3 removed), 3's series goes
        shutil.copytree(repo / "a" / "2", repo / "a" / ".v3")
        for weights in (repo / "a" / ".v3").rglob("*.safetensors"):
            weights.write_bytes(b"not safetensors")
        (repo / "a" / ".v3").rename(repo / "a" / "3")
        wait_until(lambda: _series(server, "videogen_model_ready", model="a", version="3"))
        assert server.metric("videogen_model_ready", model="a", version="3") == 0
        assert server.metric("videogen_model_ready", model="a", version="2") == 1
        assert collect(stub, request(model="a", num_frames=1, num_inference_steps=1))[0].accepted.model_version == 2
        shutil.rmtree(repo / "a" / "3")
        wait_until(lambda: not _series(server, "videogen_model_ready", model="a", version="3"))
        assert server.metric("videogen_model_ready", model="a", version="2") == 1
        # a model whose weights are broken: version 1 shows 0
        shutil.copytree(repo / "a" / "1", repo / "broken" / "1")
        for weights in (repo / "broken" / "1").rglob("*.safetensors"):
            weights.write_bytes(b"not safetensors")
        (repo / "broken" / "config.pbtxt").write_text(tiny_config("broken"))
        wait_until(lambda: _series(server, "videogen_model_ready", model="broken", version="1"))
        assert server.metric("videogen_model_ready", model="broken", version="1") == 0
        # a model whose config cannot be read: no version is known, the model shows 0 under version ""
        (repo / "bad").mkdir()
        (repo / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "svd"\nmax_batch_size: -3\n')
        wait_until(lambda: _series(server, "videogen_model_ready", model="bad", version=""))
        # models that leave the repository take their series along
        shutil.rmtree(repo / "broken")
        shutil.rmtree(repo / "bad")
        wait_until(lambda: not _series(server, "videogen_model_ready", model="broken")
                 and not _series(server, "videogen_model_ready", model="bad"))
        assert server.metric("videogen_model_ready", model="a", version="2") == 1


def test_no_reload_starts_once_a_drain_has(make_repo):
    """A drain ends the polling: a config changed during it would start a reload (a compile, minutes)
    that the shutdown then cancels. The edit is picked up by the next start instead."""
    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        runtime = server.engine.models["a"].loaded[1]
        server.loop.call_soon_threadsafe(server.engine.begin_drain)
        wait_until(lambda: server.engine._poller.done())
        (repo / "a" / "config.pbtxt").write_text(tiny_config("a") + "\n# edited\n")
        time.sleep(1.0)  # five poll periods
        assert server.engine.models["a"].loaded[1] is runtime and not server.engine._control_tasks


def test_poll_reloads_only_the_version_that_changed_symlinks_included(make_repo):
    """Each reload of a served version is a load and, on a GPU, a recompile with both copies in memory.
    Poll mode reloaded every served version when any file of the model changed: a staging folder for
    the next version, a note, a new version folder. And it did not look into symlinked version folders,
    so a version swapped atomically through its symlink (git-sync, many deploy tools) kept its old
    weights (black-box review)."""
    import os

    repo = make_repo({"a": tiny_config("a", "version_policy: { all: {} }")})
    store = repo.parent / "store"
    store.mkdir()
    (repo / "a" / "1").rename(store / "w1")
    shutil.copytree(store / "w1", store / "w2")
    (repo / "a" / "1").symlink_to(store / "w1")
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        def runtime(version: int):
            rt = server.engine.models["a"].loaded.get(version)
            return rt if rt is not None and rt.state == "READY" else None

        v1 = runtime(1)
        assert v1 is not None
        (repo / "a" / ".staging-v2").mkdir()
        shutil.copytree(store / "w1", repo / "a" / ".staging-v2" / "2")
        (repo / "a" / "NOTES.md").write_text("v2 tomorrow")
        time.sleep(1.0)  # five polls
        assert runtime(1) is v1, "files outside the version folders reloaded version 1"
        (repo / "a" / ".staging-v2" / "2").rename(repo / "a" / "2")  # the rollout of version 2
        wait_until(lambda: runtime(2) is not None)
        assert runtime(1) is v1, "a new version reloaded version 1"
        (repo / "a" / "1.next").symlink_to(store / "w2")
        os.replace(repo / "a" / "1.next", repo / "a" / "1")  # version 1 swapped atomically
        wait_until(lambda: runtime(1) not in (None, v1))
        assert collect(server.stub(), request(model="a", model_version=1, num_frames=1,
                                              num_inference_steps=1))[-1].HasField("summary")


def test_a_failed_reload_in_place_is_told_beside_the_version_that_serves(make_repo):
    """Weights updated in place that fail to load: the previous load serves on (as Triton's), but
    GetModel, the repository index and the metrics all looked as if the update had gone live. (Each
    file is replaced as rsync and `mv` do, a new file renamed over the old: a CPU instance's weights
    are views of the memory-mapped files, which a write into the same file would pull away.)"""
    import os

    repo = make_repo({"a": tiny_config("a")})
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        stub = server.stub()
        for weights in (repo / "a" / "1").rglob("*.safetensors"):
            weights.with_suffix(".new").write_bytes(b"not safetensors")
            os.replace(weights.with_suffix(".new"), weights)

        def version_1():
            return stub.GetModel(pb.GetModelRequest(name="a")).versions[0]

        wait_until(lambda: version_1().reason.startswith("a reload failed (the previous load serves): "))
        assert version_1().state == pb.MODEL_STATE_READY
        assert collect(stub, request(model="a", num_frames=1, num_inference_steps=1))[-1].HasField("summary")


RECORDING_BACKEND = '''
import json
from pathlib import Path

import numpy as np

from videogen_server.backends import Backend, Finished, FramesDecoded, StepDone

LOADS = []  # (version, the config's "tag" parameter) per instance start
FAIL = set()  # versions whose load fails


class RecordingBackend(Backend):
    name = "recording"

    @classmethod
    def validate_parameters(cls, parameters):
        pass

    @classmethod
    def model_defaults(cls, version_path):  # a checkpoint's own defaults, as SVD's 14 and SVD-XT's 25 frames
        f = Path(version_path) / "defaults.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def initialize(self, context):
        LOADS.append((context.model_version, context.parameters.get("tag", "")))
        if context.model_version in FAIL:
            raise RuntimeError("injected load failure")

    def prepare(self, params, image):
        return 0

    def execute(self, requests):
        for r in requests:
            p = r.params
            r.sender.send(StepDone(1, 1))
            r.sender.send(FramesDecoded(chunk_index=0, start_index=0,
                                        frames=np.zeros((p.num_frames, p.height, p.width, 3), np.uint8)))
            r.sender.send(Finished())

    def finalize(self):
        pass
'''


def _recording_config(tag: str) -> str:
    return ('name: "a"\nbackend: "recording"\ninstance_group [ { kind: KIND_CPU } ]\nversion_policy: { all: {} }\n'
            f'parameters {{ key: "tag" value {{ string_value: "{tag}" }} }}\n'
            'parameters { key: "default_width" value { string_value: "16" } }\n'
            'parameters { key: "default_height" value { string_value: "16" } }\n'
            'parameters { key: "min_width" value { string_value: "16" } }\n'
            'parameters { key: "min_height" value { string_value: "16" } }\n')


def test_a_version_is_kept_only_while_nothing_it_was_loaded_with_changed(tmp_path, monkeypatch):
    """Poll mode keeps a version serving when another version changes, but not one whose last reload
    failed (it served the old config for good), nor one whose settings a rollback changed (the defaults
    come from the highest version served: removing version 2 left its 25 frames as the model's)."""
    import json

    from ..helpers import install_backend

    backend = install_backend(tmp_path, monkeypatch, "recording_backend_pkg", "recording", RECORDING_BACKEND)
    repo = tmp_path / "repo"
    (repo / "a" / "1").mkdir(parents=True)
    (repo / "a" / "1" / "defaults.json").write_text(json.dumps({"num_frames": 14}))
    (repo / "a" / "config.pbtxt").write_text(_recording_config("old"))
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        entry, stub = server.engine.models["a"], server.stub()

        def ready(version: int):
            rt = entry.loaded.get(version)
            return rt if rt is not None and rt.state == "READY" else None

        v1 = ready(1)
        backend.FAIL.add(1)  # the new config's reload of version 1 fails (both copies in memory, say)
        (repo / "a" / "config.pbtxt").write_text(_recording_config("new"))
        wait_until(lambda: 1 in entry.failed)
        assert ready(1) is v1
        backend.FAIL.clear()
        (repo / "a" / "2").mkdir()  # a rollout; version 1's files and the config unchanged since
        (repo / "a" / "2" / "defaults.json").write_text(json.dumps({"num_frames": 25}))
        wait_until(lambda: ready(2) is not None and ready(1) not in (None, v1))
        assert ready(1).settings.parameters["tag"] == "new", "version 1 retried with the config it failed on"
        assert stub.GetModel(pb.GetModelRequest(name="a")).defaults.num_frames == 25
        shutil.rmtree(repo / "a" / "2")  # rolled back: version 1's checkpoint gives the defaults again
        wait_until(lambda: 2 not in entry.loaded and ready(1) is not None
                 and stub.GetModel(pb.GetModelRequest(name="a")).defaults.num_frames == 14)


def test_new_files_seen_by_a_load_that_failed_are_loaded_once_it_can(tmp_path, monkeypatch):
    """A version's files replaced while config.pbtxt was broken: the failed load kept the new files'
    fingerprint as the model's, and once the config was mended the version compared equal to it and was
    kept: the old weights served on for good, READY, no reason given (repository review). What a version
    serves is now the fingerprint its own runtime loaded from."""
    import os
    import sys

    from videogen_server.engine import repository

    from ..helpers import install_backend

    sys.modules.pop("recording_backend_pkg", None)  # its LOADS of this test alone
    backend = install_backend(tmp_path, monkeypatch, "recording_backend_pkg", "recording", RECORDING_BACKEND)
    repo = tmp_path / "repo"
    (repo / "a" / "1").mkdir(parents=True)
    (repo / "a" / "1" / "weights.bin").write_text("W0")
    (repo / "a" / "config.pbtxt").write_text(_recording_config("old"))
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        entry = server.engine.models["a"]
        assert backend.LOADS == [(1, "old")]
        (repo / "a" / "config.pbtxt").write_text(_recording_config("old") + "max_batch_size: oops\n")
        wait_until(lambda: entry.error != "")
        broken = entry.fingerprint
        (repo / "a" / "1" / "weights.new").write_text("W1")  # renamed over the old, as README advises
        os.replace(repo / "a" / "1" / "weights.new", repo / "a" / "1" / "weights.bin")
        # a poll saw the new weights (the whole replace, not the file written beside them), and its load failed
        wait_until(lambda: entry.fingerprint != broken
                 and entry.fingerprint == repository.fingerprint(repo / "a") and entry.error != "")
        assert entry.error != "" and backend.LOADS == [(1, "old")]
        (repo / "a" / "config.pbtxt").write_text(_recording_config("old"))  # the typo mended
        wait_until(lambda: len(backend.LOADS) == 2, timeout=10)  # version 1 reloaded: it had never read W1
        assert entry.error == "" and entry.loaded[1].state == "READY"


def test_a_model_whose_last_version_folder_is_removed_stops_serving_it(tmp_path, monkeypatch):
    """Removing the model's folder unloads it, and removing one of its versions retires that one; removing
    its last version folder left that version serving, READY, for good (repository review). It is
    unloaded, the reason said; a version folder back loads again."""
    import json

    from ..helpers import install_backend

    install_backend(tmp_path, monkeypatch, "recording_backend_pkg", "recording", RECORDING_BACKEND)
    repo = tmp_path / "repo"
    (repo / "a" / "1").mkdir(parents=True)
    (repo / "a" / "1" / "defaults.json").write_text(json.dumps({"num_frames": 2}))
    (repo / "a" / "config.pbtxt").write_text(_recording_config("old"))
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.2) as server:
        stub, entry = server.stub(), server.engine.models["a"]
        small = dict(num_frames=1, num_inference_steps=1, width=16, height=16, output={"stream_video": False})
        assert collect(stub, request(model="a", **small))[-1].HasField("summary")
        shutil.move(repo / "a" / "1", tmp_path / "v1")
        wait_until(lambda: "selects no version folder" in entry.error and not entry.loaded)
        model = stub.GetModel(pb.GetModelRequest(name="a"))
        assert model.state != pb.MODEL_STATE_READY and "selects no version folder" in model.reason, model
        assert server.metric("videogen_model_ready", model="a", version="1") == 0
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="a", **small))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        shutil.move(tmp_path / "v1", repo / "a" / "1")
        wait_until(lambda: entry.loaded.get(1) is not None and entry.loaded[1].state == "READY")
        assert collect(stub, request(model="a", **small))[-1].HasField("summary")


def test_a_model_in_two_repositories_is_logged_once_not_at_every_poll(tmp_path, monkeypatch, caplog):
    """The scan said "is in two repositories" (and "leads outside its repository", a bad name) at every
    poll: at the default 15 s, ~5 800 error lines a day for one duplicate (repository review)."""
    from ..helpers import install_backend

    install_backend(tmp_path, monkeypatch, "recording_backend_pkg", "recording", RECORDING_BACKEND)
    first, second = tmp_path / "first", tmp_path / "second"
    for repo in (first, second):
        (repo / "a" / "1").mkdir(parents=True)
        (repo / "a" / "config.pbtxt").write_text(_recording_config("old"))
    from videogen_server.engine import repository

    scans = []
    real_scan = repository.scan
    monkeypatch.setattr(repository, "scan", lambda *a, **kw: scans.append(1) or real_scan(*a, **kw))
    caplog.set_level("ERROR", logger="videogen_server")
    with ServerThread(first, second, model_control_mode="poll", repository_poll_seconds=0.1) as server:
        wait_until(lambda: len(scans) >= 5)  # the start's scan and at least four polls
        assert server.engine.models["a"].path == first / "a"
    said = [r for r in caplog.records if "is in two repositories" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


def test_a_reload_with_fewer_instances_takes_their_peak_memory_series_along(make_repo):
    """A version reloaded in place from 2 instances to 1 kept instance 1's last-peak gauge for good
    (only a version's going took its peaks along; metrics audit)."""
    from ..helpers import Stream

    repo = make_repo({"a": tiny_config("a", "instance_group [ { count: 2, kind: KIND_CPU } ]")})
    with ServerThread(repo, model_control_mode="poll", repository_poll_seconds=0.3) as server:
        peaks = ("videogen_request_peak_memory_bytes",)
        for _ in range(5):  # two at once run on the two instances (no batching)
            streams = [Stream(server.stub(), request(model="a", num_frames=2, num_inference_steps=3)) for _ in range(2)]
            for s in streams:
                s.join()
            if _series(server, *peaks, model="a", instance="1") and _series(server, *peaks, model="a", instance="0"):
                break
        assert _series(server, *peaks, model="a", version="1", instance="1")
        (repo / "a" / "config.pbtxt").write_text(tiny_config("a", "instance_group [ { count: 1, kind: KIND_CPU } ]"))
        wait_until(lambda: len(server.engine.models["a"].loaded[1].instances) == 1 and
                 not _series(server, *peaks, model="a", instance="1"))
        assert _series(server, *peaks, model="a", version="1", instance="0")  # the instance it still has
