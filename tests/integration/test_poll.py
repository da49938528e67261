"""Model control mode `poll`: changed models reload, new ones load, removed ones unload."""
from __future__ import annotations

import shutil
import time

import grpc
import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, collect, request, tiny_config


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.1)


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
        wait_for(lambda: defaults_steps("a") == 3)
        assert len([r for r in collect(stub, request(model="a", num_frames=1)) if r.HasField("progress")]) == 3
        # a new model folder is loaded
        shutil.copytree(repo / "a" / "1", repo / "b" / "1")
        (repo / "b" / "config.pbtxt").write_text(tiny_config("b"))
        wait_for(lambda: any(m.name == "b" and m.state == pb.MODEL_STATE_READY
                             for m in stub.ListModels(pb.ListModelsRequest()).models))
        assert collect(stub, request(model="b", num_frames=1, num_inference_steps=1))[-1].HasField("summary")
        # a removed one is unloaded and forgotten
        shutil.rmtree(repo / "b")
        wait_for(lambda: "b" not in [m.name for m in stub.ListModels(pb.ListModelsRequest()).models])
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, request(model="b", num_frames=1, num_inference_steps=1))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
