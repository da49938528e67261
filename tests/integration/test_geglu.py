"""The svd backend's `fused_geglu`: the Triton kernel's arithmetic and the UNet it is fused into, run by
Triton's interpreter on the CPU (the GPU the kernel is written for cannot run here: the interpreter stands
in for it, in a process of its own); the kernel compiled for a Hopper target (no device needed);
torch.compile (fullgraph) capturing each fused GEGLU of the UNet as one Triton kernel call; and a CPU
server refusing the option for that model alone, by name, before loading its weights. The kernel's speed
and its bfloat16 figures come from a GPU (bench/geglu_bench.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, collect, request, tiny_config

SCRIPT = Path(__file__).with_name("geglu_interpreted.py")
SM90 = Path(__file__).with_name("geglu_sm90.py")


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def test_the_fused_kernel_and_the_fused_unet_under_tritons_interpreter(tiny_model_source):
    pytest.importorskip("triton")  # Linux wheels only (the test extra installs it there)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_source / "1" / "unet")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["interpreted"]
    assert {k["dtype"] for k in figures["kernel"]} == {"torch.float32", "torch.float16"}
    # one rounding to float16 instead of two: nearer the exact value than diffusers' own float16 GEGLU
    half = [k for k in figures["kernel"] if k["dtype"] == "torch.float16"]
    assert sum(k["max_abs_err"] for k in half) < sum(k["stock_max_abs_err"] for k in half)
    assert figures["unet_max_abs_diff"] < 1e-5 * max(1.0, figures["unet_max_abs"])


def test_the_kernel_compiles_for_hopper_with_tensor_cores_and_writes_only_its_output():
    """What the interpreter does not check: Triton's code generator (which refuses, for one, a kernel reading
    a plain global) for every tile shape the autotuner may pick, the tensor-core instructions and registers
    of the result on sm_90, and torch.compile's analysis of which tensors the kernel writes."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SM90)], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(figures["configs"]) >= 5 and all(c["wgmma"] > 0 for c in figures["configs"])
    assert figures["mutated"] == ["out_ptr"]


def test_a_cpu_instance_refuses_fused_geglu_by_name_and_the_other_models_serve(make_repo):
    repo = make_repo({
        "fused": tiny_config("fused", parameters=TINY_PARAMETERS + _param("fused_geglu", "true")),
        "typo": tiny_config("typo", parameters=TINY_PARAMETERS + _param("fused_geglu", "yes please")),
        "plain": tiny_config("plain"),
    })
    with ServerThread(repo) as server:
        for name in ("fused", "typo"):
            info = server.stub().GetModel(pb.GetModelRequest(name=name))
            assert info.state != pb.MODEL_STATE_READY
        errors = {name: server.engine.models[name].error for name in ("fused", "typo")}
        assert "fused_geglu: needs a GPU instance (a Triton kernel), not cpu" in errors["fused"]
        assert "fused_geglu: 'yes please' is not a boolean" in errors["typo"]
        responses = collect(server.stub(), request(model="plain", num_frames=2, num_inference_steps=2))
        assert responses[-1].WhichOneof("event") == "summary"


def test_torch_compile_takes_the_fused_unets_kernels_whole(tiny_model_source, monkeypatch):
    """The server compiles the UNet with fullgraph=True: each fused GEGLU must be captured as one Triton
    kernel call in the graph, not break it. Dynamo takes user Triton kernels only where torch finds a
    device Triton can use, so here (no GPU) torch's check is made to say yes and the CPU stands in for the
    GPU (`GEGLU_DEVICES`); the captured graph is inspected, not run (Triton cannot launch on the CPU)."""
    pytest.importorskip("triton")
    import torch
    import torch.utils._triton as torch_triton
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.activations import GEGLU

    from videogen_server.backends.svd import accel, geglu_kernel

    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    geglus = sum(type(m) is GEGLU for m in unet.modules())
    assert accel.fused_geglu(unet) == geglus > 0
    monkeypatch.setattr(torch_triton, "has_triton", lambda: True)
    monkeypatch.setattr(accel, "GEGLU_DEVICES", ("cuda", "cpu"))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: [torch.zeros(1)]  # not run

    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 3, 8, 6, 8, generator=g), timestep=torch.tensor(1.0),
                  encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, generator=g),
                  added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2))
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            torch.compile(unet, fullgraph=True, backend=capture)(**inputs, return_dict=False)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
    assert len(calls) == geglus
    for node in calls:
        assert len(node.kwargs["grid"]) == len(geglu_kernel.CONFIGS)  # one grid per tile shape Triton may pick
        assert set(node.kwargs["kwargs"]) >= {"x_ptr", "w_ptr", "b_ptr", "out_ptr"}
