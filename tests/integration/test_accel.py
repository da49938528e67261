"""The svd backend's speed options on the tiny model over real gRPC: what each does to the frames, and
that a compiled VAE decoder serves every decode_chunk_size without recompiling.

FP8 runs here through torch._scaled_mm's CPU kernel (the same code path as on a GPU, other kernels);
cpu_offload needs a GPU, so its phase logic is checked on the meta device instead (said in that test).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re

import numpy as np
import pytest
import torch

from videogen.v1 import videogen_pb2 as pb

from ..helpers import TINY_PARAMETERS, ServerThread, collect, raw_frames, request, tiny_config

RAW = {"frame_encoding": pb.FRAME_ENCODING_RAW_RGB}


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def _frames(server, model: str, **fields) -> np.ndarray:
    responses = collect(server.stub(), request(model=model, output=RAW, **fields))
    assert responses[-1].WhichOneof("event") == "summary", responses[-1]
    return np.stack(raw_frames(responses)).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture
def compile_cache(tmp_path, monkeypatch):
    """The test's own compile_cache_dir, in force for the test: the process takes the first folder a model
    names and ignores later ones (use_compile_cache), so without this a test looking into its folder
    passed only when it ran first (after test_compiled_static_fp8_..., it found it empty). Restored after."""
    from videogen_server.backends.svd import accel

    monkeypatch.setattr(accel, "_cache_dir", None)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)  # use_compile_cache sets them; monkeypatch puts them back
    return tmp_path / "compile-cache"


CASES = [dict(seed=7, num_frames=5, num_inference_steps=3, decode_chunk_size=2),
         dict(seed=3, num_frames=4, num_inference_steps=2, decode_chunk_size=3, width=48, height=32, fps=12)]


def test_fused_projections_attention_backend_channels_last_and_fp8_against_the_plain_model(make_repo):
    repo = make_repo({
        "plain": tiny_config("plain"),
        "fused": tiny_config("fused", parameters=TINY_PARAMETERS + _param("fuse_qkv", "true")),
        "fp8": tiny_config("fp8", parameters=TINY_PARAMETERS + _param("fp8", "true")),
        "fp8s": tiny_config("fp8s", parameters=TINY_PARAMETERS + _param("fp8", "static")),
        # with the rewrites part11 runs it with: the projections the fold bypasses see no input, stay dynamic
        "fp8s_folded": tiny_config("fp8s_folded", parameters=TINY_PARAMETERS + _param("fp8", "static")
                                   + _param("fuse_qkv", "true") + _param("fold_cross_attention", "true")
                                   + _param("temporal_convs_2d", "true")),
        "nhwc": tiny_config("nhwc", parameters=TINY_PARAMETERS + _param("channels_last", "true")),
        "blocks": tiny_config("blocks", parameters=TINY_PARAMETERS + _param("forward_chunking", "1024")),
        "folded": tiny_config("folded", parameters=TINY_PARAMETERS + _param("fold_cross_attention", "true")
                              + _param("temporal_convs_2d", "true")),
        "splitgn": tiny_config("splitgn", parameters=TINY_PARAMETERS + _param("split_group_norm", "true")),
        "uptransposed": tiny_config("uptransposed", parameters=TINY_PARAMETERS + _param("fold_upsample", "transposed")),
        "upphases": tiny_config("upphases", parameters=TINY_PARAMETERS + _param("fold_upsample", "phases")),
    })
    plain = {}
    with ServerThread(repo) as server:
        for i, case in enumerate(CASES):
            plain[i] = _frames(server, "plain", **case)
            # one projection instead of three: the same products, the same frames
            assert np.array_equal(_frames(server, "fused", **case), plain[i])
            # another convolution layout: the same maths, float rounding apart
            assert np.abs(_frames(server, "nhwc", **case) - plain[i]).max() <= 1
            # feed-forward over blocks of 1024 tokens (the top level has 3072-7680): the same per-token maths
            assert np.abs(_frames(server, "blocks", **case) - plain[i]).max() <= 1
            # one-token cross-attention as its value projection, temporal convolutions as 2-d: the same sums
            assert np.abs(_frames(server, "folded", **case) - plain[i]).max() <= 1
            # group norms from per-channel statistics: the same maths, another order of the sums
            assert np.abs(_frames(server, "splitgn", **case) - plain[i]).max() <= 1
            # nearest 2x and the convolution after it as one convolution of the source: the same sums
            for name in ("uptransposed", "upphases"):
                assert np.abs(_frames(server, name, **case) - plain[i]).max() <= 1
            # FP8 linears change frames a little, and only a little (about 38-41 dB on this model)
            fp8 = _frames(server, "fp8", **case)
            assert np.abs(fp8 - plain[i]).max() > 0, "fp8 must actually run in 8 bit"
            assert _psnr(fp8, plain[i]) > 30
            # static scales (calibrated on the first request) lose little more than per-row dynamic ones
            for name in ("fp8s", "fp8s_folded"):
                fp8s = _frames(server, name, **case)
                assert np.abs(fp8s - plain[i]).max() > 0 and _psnr(fp8s, plain[i]) > 30, (name, _psnr(fp8s, plain[i]))
        # the options were applied, not only harmless
        from videogen_server.backends.svd import accel
        pipe = next(iter(server.engine.models["folded"].loaded.values())).instances[0].backend.pipe
        unet = pipe.unet
        for model in (unet, pipe.vae):  # the VAE decoder's temporal convolutions too
            assert any(isinstance(m, accel.FramesConv2d) for m in model.modules())
            assert not any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
        assert any(isinstance(getattr(m, "processor", None), accel.OneTokenCrossAttention) for m in unet.modules())
        split = next(iter(server.engine.models["splitgn"].loaded.values())).instances[0].backend.pipe
        for model in (split.unet, split.vae.decoder):
            assert any(isinstance(m, accel.SplitGroupNorm) for m in model.modules())
            assert not any(type(m) is torch.nn.GroupNorm for m in model.modules())
        for name, how in (("uptransposed", "transposed"), ("upphases", "phases")):
            up = next(iter(server.engine.models[name].loaded.values())).instances[0].backend.pipe
            for model in (up.unet, up.vae.decoder):
                assert [m.fold for m in model.modules() if hasattr(m, "fold")] == [how]
        # fuse_qkv, channels_last and forward_chunking too (their frames equal the plain model's whether
        # applied or not: tests audit)
        from diffusers.models.attention import FeedForward
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        def pipe_of(name):
            return next(iter(server.engine.models[name].loaded.values())).instances[0].backend.pipe

        attentions = [m for m in pipe_of("fused").unet.modules() if isinstance(m, Attention)]
        assert attentions and all(isinstance(m.processor, FusedAttnProcessor2_0) and m.fused_projections
                                  for m in attentions)
        for model in (pipe_of("nhwc").unet, pipe_of("nhwc").vae):
            convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
            assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last if m.weight.dim() == 4
                                                        else torch.channels_last_3d) for m in convs)
        feed_forwards = [m for m in pipe_of("blocks").unet.modules() if isinstance(m, FeedForward)]
        assert feed_forwards and all(m._videogen_block_rows == 1024 for m in feed_forwards)
    # The attention kernel preference is process-wide (torch's switches are): a server of its own.
    import shutil

    from torch.nn.attention import SDPBackend

    for name in ("plain", "fused", "fp8", "fp8s", "fp8s_folded", "nhwc", "blocks", "folded", "splitgn", "uptransposed",
                 "upphases"):
        shutil.rmtree(repo / name)  # make_repo adds to the same folder
    repo2 = make_repo({
        "math": tiny_config("math", parameters=TINY_PARAMETERS + _param("attention_backend", "math")),
        "math2": tiny_config("math2", parameters=TINY_PARAMETERS + _param("attention_backend", "math")
                             + _param("cudnn_benchmark", "true")),
    })
    default_order = torch._C._get_sdp_priority_order()
    assert not torch.backends.cudnn.benchmark
    with ServerThread(repo2) as server:
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.MATH)
        assert torch.backends.cudnn.benchmark, "process-wide while the model that asked is loaded"
        for i, case in enumerate(CASES):  # the same maths, float rounding apart
            assert np.abs(_frames(server, "math", **case) - plain[i]).max() <= 1
    # unloading every model that asked for it gives torch its own choice back
    assert torch._C._get_sdp_priority_order() == default_order
    assert not torch.backends.cudnn.benchmark


def test_two_attention_preferences_in_one_process_refuse_the_second(make_repo):
    repo = make_repo({
        "math": tiny_config("math", parameters=TINY_PARAMETERS + _param("attention_backend", "math")),
        "flash": tiny_config("flash", parameters=TINY_PARAMETERS + _param("attention_backend", "flash")),
    })
    with ServerThread(repo) as server:
        errors = {name: server.engine.models[name].error for name in ("math", "flash")}
        refused = [name for name, error in errors.items() if "process-wide" in error]
        assert len(refused) == 1, errors  # whichever loaded second
        assert "already prefers" in errors[refused[0]]


@pytest.mark.timeout(600)  # Inductor compiles four graphs from a cold cache: ~100 s on 2 busy cores
def test_compiled_vae_decoder_serves_every_chunk_length_without_recompiling(make_repo, compile_cache):
    """compile_vae: one dynamic-frames graph set per size, built by the warm-up; frames as eager; the
    compiled code lands in compile_cache_dir."""
    warm = 'model_warmup [ { name: "w" inputs { key: "num_frames" value: "5" } inputs { key: "decode_chunk_size" ' \
           'value: "2" } inputs { key: "num_inference_steps" value: "1" } } ]'
    limits = TINY_PARAMETERS.replace('"max_num_frames" value { string_value: "16" }',
                                     '"max_num_frames" value { string_value: "8" }')
    repo = make_repo({
        "eager": tiny_config("eager", parameters=limits),
        "compiled": tiny_config("compiled", warm, parameters=limits + _param("compile_vae", "default")
                                + _param("compile_cache_dir", str(compile_cache))
                                + _param("compile_options", "conv_1x1_as_mm=true; epilogue_fusion=false")
                                # channels-last convolutions in the dynamic-frames graph (on a GPU, Inductor
                                # leaves them off there; on CPU, oneDNN has them on anyway), 2-d temporal ones
                                + _param("compile_vae_options", "force_layout_optimization=true; epilogue_fusion=true")
                                + _param("temporal_convs_2d", "true")),
        "typo": tiny_config("typo", parameters=TINY_PARAMETERS + _param("compile_vae", "default")
                            + _param("compile_options", "conv_1x1_as_mmm=true")),
        "vae_typo": tiny_config("vae_typo", parameters=TINY_PARAMETERS + _param("compile_vae", "default")
                                + _param("compile_vae_options", "force_layout_optimisation=true")),
    })
    with ServerThread(repo) as server:
        assert "compile_options: unknown Inductor option(s) ['conv_1x1_as_mmm']" in server.engine.models["typo"].error
        assert "compile_vae_options: unknown Inductor option(s) ['force_layout_optimisation']" \
            in server.engine.models["vae_typo"].error
        decoder = next(iter(server.engine.models["compiled"].loaded.values())).instances[0].backend.decoder
        assert decoder.options == {"conv_1x1_as_mm": True, "epilogue_fusion": True, "force_layout_optimization": True}
        labels = {"model": "compiled", "version": "1"}
        graphs = server.metric("videogen_compiles_total", **labels)
        assert graphs >= 2, "the warm-up builds the one-frame graph and the dynamic one"
        assert server.metric("videogen_recompiles_total", **labels) == 0
        assert server.metric("videogen_compiles_total", model="eager", version="1") == 0
        lookups = {r: server.metric("videogen_compile_cache_lookups_total", result=r, **labels)
                   for r in ("hit", "miss", "bypass")}
        assert lookups == {"hit": 0, "miss": graphs, "bypass": 0}, lookups  # a new cache: each compiled from scratch
        cached = [p for p in compile_cache.rglob("*") if p.is_file()]
        assert cached, "Inductor's cache should be in compile_cache_dir"
        for frames, chunk in [(5, 1), (5, 2), (5, 3), (5, 5), (8, 8), (7, 4), (2, 2)]:
            case = dict(seed=5, num_frames=frames, num_inference_steps=2, decode_chunk_size=chunk)
            assert np.abs(_frames(server, "compiled", **case) - _frames(server, "eager", **case)).max() <= 1, case
        assert server.metric("videogen_compiles_total", **labels) == graphs
        assert server.metric("videogen_recompiles_total", **labels) == 0
        assert server.metric("videogen_eager_fallbacks_total", **labels) == 0
        # a size outside the warmed set decodes uncompiled (unwarmed_shapes: eager, the default): no
        # graph is built while serving, and the metric says so
        case = dict(seed=5, num_frames=3, num_inference_steps=1, width=48, height=32)
        assert np.abs(_frames(server, "compiled", **case) - _frames(server, "eager", **case)).max() <= 1
        assert server.metric("videogen_compiles_total", **labels) == graphs
        assert server.metric("videogen_eager_fallbacks_total", **labels) == 1


@pytest.mark.timeout(600)  # Inductor compiles the tiny UNet twice (once per model): ~1-2 min on 2 busy cores
def test_compiled_unet_runs_shapes_the_warm_up_did_not_compile_eagerly(make_repo, compile_cache, monkeypatch):
    """unwarmed_shapes: a compiled UNet serves a shape its warm-up did not compile (here: a request
    without guidance, which halves the UNet's batch, and another size) uncompiled by default, instead
    of stalling the instance for a compile; `compile` builds the graph as before, until Dynamo's
    recompile limit, past which the shape runs uncompiled instead of failing. All counted."""
    warm = 'model_warmup [ { name: "w" inputs { key: "num_frames" value: "3" } inputs { key: ' \
           '"num_inference_steps" value: "1" } } ]'
    compiled = TINY_PARAMETERS + _param("compile", "default") + _param("compile_cache_dir", str(compile_cache))
    repo = make_repo({
        "eager": None,
        "strict": tiny_config("strict", warm, parameters=compiled),
        "lenient": tiny_config("lenient", warm, parameters=compiled + _param("unwarmed_shapes", "compile")),
        "typo": tiny_config("typo", warm, parameters=compiled + _param("unwarmed_shapes", "never")),
    })
    with ServerThread(repo) as server:
        assert "unwarmed_shapes: 'never' is not one of ['eager', 'compile']" in server.engine.models["typo"].error
        strict, lenient = {"model": "strict", "version": "1"}, {"model": "lenient", "version": "1"}
        graphs = server.metric("videogen_compiles_total", **strict)
        assert graphs >= 1
        warmed = dict(seed=5, num_frames=3, num_inference_steps=2, fps=12)
        no_guidance = dict(warmed, min_guidance_scale=1.0, max_guidance_scale=1.0)
        other_size = dict(warmed, width=48, height=32)
        for case, fallbacks in ((warmed, 0), (no_guidance, 1), (other_size, 2)):
            assert np.abs(_frames(server, "strict", **case) - _frames(server, "eager", **case)).max() <= 1, case
            assert server.metric("videogen_eager_fallbacks_total", **strict) == fallbacks, case
        assert server.metric("videogen_compiles_total", **strict) == graphs
        assert server.metric("videogen_recompiles_total", **strict) == 0

        assert np.abs(_frames(server, "lenient", **no_guidance) - _frames(server, "eager", **no_guidance)).max() <= 1
        recompiles = server.metric("videogen_recompiles_total", **lenient)
        assert recompiles >= 1
        assert server.metric("videogen_eager_fallbacks_total", **lenient) == 0
        # Dynamo refuses more graphs of one code object than its recompile limit (the server raises it to
        # 64, counting every shape of every instance in the process): a new shape past it runs uncompiled
        # instead of failing its requests. To reach it here, the limit is lowered to 1 on the instance's
        # thread (Dynamo's settings are per thread) right before its UNet calls; the calls run unchanged.
        from videogen_server.backends.svd.backend import SVDBackend

        unet = SVDBackend._unet

        def _unet_past_the_limit(self, *args, **kwargs):
            torch._dynamo.config.recompile_limit = 1
            return unet(self, *args, **kwargs)

        monkeypatch.setattr(SVDBackend, "_unet", _unet_past_the_limit)
        assert np.abs(_frames(server, "lenient", **other_size) - _frames(server, "eager", **other_size)).max() <= 1
        assert server.metric("videogen_eager_fallbacks_total", **lenient) == 1
        assert server.metric("videogen_recompiles_total", **lenient) == recompiles


def test_compiled_static_fp8_calibrates_once_before_compiling(make_repo, compile_cache, caplog):
    """`fp8: static` with `compile`: the warm-up's first batch calibrates the activation scales eagerly,
    then the UNet compiles with them as they are (the calibration's bookkeeping never enters a graph).
    Later requests run that graph without recompiling and give nearly the frames of the same model
    uncompiled, whose scales the same warm-up request calibrated to the same values."""
    caplog.set_level(logging.INFO, logger="videogen_server.backends.svd.backend")
    warm = 'model_warmup [ { name: "w" inputs { key: "num_frames" value: "3" } inputs { key: ' \
           '"num_inference_steps" value: "2" } } ]'
    static = TINY_PARAMETERS + _param("fp8", "static")
    repo = make_repo({
        "plain": None,
        "eager": tiny_config("eager", warm, parameters=static),
        "compiled": tiny_config("compiled", warm, parameters=static + _param("compile", "default")
                                + _param("compile_cache_dir", str(compile_cache))),
    })
    with ServerThread(repo) as server:
        assert caplog.text.count("fp8 static scales of") == 2, caplog.text[-2000:]  # once per model
        from videogen_server.backends.svd.accel import Fp8Linear

        def scales(model: str) -> list[float]:
            unet = next(iter(server.engine.models[model].loaded.values())).instances[0].backend.pipe.unet
            layers = [m for m in getattr(unet, "_orig_mod", unet).modules() if isinstance(m, Fp8Linear)]
            assert layers and all(m.static and m.calibrated for m in layers)
            return [m.input_scale.item() for m in layers]

        assert scales("compiled") == scales("eager")
        labels = {"model": "compiled", "version": "1"}
        graphs = server.metric("videogen_compiles_total", **labels)
        assert graphs >= 1
        for seed in (5, 6):
            case = dict(seed=seed, num_frames=3, num_inference_steps=2)
            compiled, eager = _frames(server, "compiled", **case), _frames(server, "eager", **case)
            # not bit-equal: compiled and eager arithmetic differ by float rounding, which FP8's coarse steps
            # turn into a few levels here and there (42-45 dB here); far closer than either to 16 bit
            assert _psnr(compiled, eager) > 38 and _psnr(compiled, _frames(server, "plain", **case)) > 30, case
        assert server.metric("videogen_compiles_total", **labels) == graphs
        assert server.metric("videogen_recompiles_total", **labels) == 0
        assert server.metric("videogen_eager_fallbacks_total", **labels) == 0
        assert caplog.text.count("fp8 static scales of") == 2  # calibrated once, not per request


def test_cpu_offload_needs_a_gpu(make_repo, caplog):
    """A setting this instance cannot take is the operator's, not a bug: the reason names the parameter
    (it read "ValueError: cpu_offload: ...") and the log has no traceback (a ModelSettingError)."""
    caplog.set_level("ERROR", logger="videogen_server")
    repo = make_repo({"m": tiny_config("m", parameters=TINY_PARAMETERS + _param("cpu_offload", "true"))})
    with ServerThread(repo) as server:
        info = server.stub().GetModel(pb.GetModelRequest(name="m"))
        assert info.state != pb.MODEL_STATE_READY
        assert server.engine.models["m"].error == "version 1: cpu_offload: needs a GPU instance"
    [failed] = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert not failed.exc_info and "cpu_offload: needs a GPU instance" in failed.getMessage()


def test_compiled_unet_follows_phase_offload_without_recompiling(tiny_model_source):
    """cpu_offload with compile (modes without CUDA graphs): PhaseOffload points the UNet's tensors at
    new device copies every request, and a compiled UNet must read them, not what it was compiled with,
    and not recompile. The CPU stands in for the GPU as the "device" (a copy into fresh storage each
    time, as on a GPU); CUDA graphs, which would replay the old addresses, are refused by validation."""
    import threading

    from diffusers import UNetSpatioTemporalConditionModel

    from videogen_server.backends.svd import accel
    from videogen_server.backends.svd.backend import SVDBackend

    SVDBackend.validate_parameters({"cpu_offload": "true", "compile": "default", "compile_vae": "reduce-overhead"})
    SVDBackend.validate_parameters({"cpu_offload": "true", "compile": "max-autotune-no-cudagraphs"})
    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    x = _unet_inputs(unet)
    with torch.inference_mode():
        ref = unet(**x, return_dict=False)[0]
    off = accel.PhaseOffload({"unet": unet, "other": torch.nn.Linear(2, 2)}, torch.device("cpu"))
    compiled = torch.compile(unet, fullgraph=True, dynamic=False)
    accel.GraphCounter.install()
    me = threading.get_ident()
    outs, graphs = [], []
    with torch.inference_mode():  # as the backend's execute runs
        for _ in range(3):
            off.use("unet")
            ptr = unet.conv_in.weight.data_ptr()
            outs.append(compiled(**x, return_dict=False)[0])
            graphs.append(accel.GraphCounter.count(me))
            off.use("other")  # the UNet is off the device: its tensors point at the host copies again
            assert unet.conv_in.weight.data_ptr() != ptr
    assert graphs[0] == graphs[1] == graphs[2], f"recompiled after the weights moved: {graphs}"
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and it really reads the weights it is given now
    off.use("unet")
    with torch.inference_mode():
        unet.conv_out.bias.data.add_(1.0)
        assert (compiled(**x, return_dict=False)[0] - ref).abs().min() > 0.5


def test_phase_offload_moves_one_model_at_a_time():
    """PhaseOffload's bookkeeping, with the CPU standing in for the GPU (none here): a model "on the
    device" holds fresh copies of its tensors, one model at a time, and moving it off re-points it at
    the host copies it started with (pinned on a GPU machine), with no copy back."""
    from videogen_server.backends.svd.accel import PhaseOffload

    a, b = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    conv = torch.nn.Conv2d(3, 16, 3).to(memory_format=torch.channels_last)
    tensors = lambda m: list(m.parameters()) + list(m.buffers())  # noqa: E731
    weights = {id(t): t.detach().clone() for m in (a, b, conv) for t in tensors(m)}
    off = PhaseOffload({"a": a, "b": b, "conv": conv}, torch.device("cpu"))
    # one flat host buffer per model, values and strides kept (channels_last stays channels_last)
    assert all(torch.equal(t, weights[id(t)]) for m in (a, b, conv) for t in tensors(m))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert len({t.untyped_storage().data_ptr() for t in tensors(b)}) == 1
    off.use("conv")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    host = {id(t): t.data.data_ptr() for m in (a, b) for t in tensors(m)}
    on_host = lambda m: all(t.data.data_ptr() == host[id(t)] for t in tensors(m))  # noqa: E731
    on_device = lambda m: not any(t.data.data_ptr() == host[id(t)] for t in tensors(m))  # noqa: E731
    assert on_host(a) and on_host(b)
    x = torch.randn(2, 4)
    before = b(a(x))
    off.use("a")
    assert on_device(a) and on_host(b)
    off.use("b")
    assert on_host(a) and on_device(b)
    off.use("b")
    assert off.current == "b" and on_device(b)
    assert torch.equal(b(a(x)), before)  # same values wherever they live
    off.release()
    assert on_host(a) and on_host(b) and off.current is None


def test_static_fp8_scales_calibrated_on_the_device_survive_the_offload():
    """Low-memory mode keeps the host copy of each tensor as the master: scales calibrated while the UNet
    was on the device must reach that copy (the backend writes them back), or the next request's UNet
    comes back with zero scales and every FP8 layer outputs its bias alone. The CPU stands in for the GPU."""
    from videogen_server.backends.svd.accel import PhaseOffload, fp8_calibration, to_fp8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    ref = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    ref.load_state_dict(model.state_dict())
    to_fp8(model, static=True)
    off = PhaseOffload({"unet": model, "other": torch.nn.Linear(4, 4)}, torch.device("cpu"))
    x = torch.randn(4, 64)
    off.use("unet")
    with fp8_calibration(model) as layers:
        model(x)
    off.write_back("unet", [b for m in layers for b in (m.input_scale, m.input_amax)])
    scales = [m.input_scale.clone() for m in layers]
    off.use("other")  # the next request: the UNet goes and comes back from its host copy
    off.use("unet")
    assert all(torch.equal(m.input_scale, s) for m, s in zip(layers, scales))
    assert ((model(x) - ref(x)).norm() / ref(x).norm()).item() < 0.08


def test_fp8_linear_matches_a_16bit_linear_closely():
    from videogen_server.backends.svd.accel import Fp8Linear, to_fp8

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    fp8 = Fp8Linear(lin)
    y, ref = fp8(x), lin(x)
    assert y.shape == ref.shape == (3, 5, 32)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05  # e4m3 keeps ~3 significant bits per element; errors average out over K
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))  # 10: not a multiple of 16
    assert to_fp8(model) == 1 and isinstance(model[0], Fp8Linear) and isinstance(model[1], torch.nn.Linear)


def test_static_fp8_scales_are_calibrated_then_fixed():
    """A static FP8 layer scales dynamically until calibrated; calibration sets its one activation scale to
    twice the largest input magnitude it met over e4m3's 448 (headroom: a larger input later is not
    clipped at once); after it, the scale stays whatever the input. A calibration that reached no layer
    fails, rather than leave the model unscaled (one that misses some leaves those dynamic: the backend's
    test with fold_cross_attention)."""
    from videogen_server.backends.svd.accel import FP8_MAX, Fp8Linear, fp8_calibration, to_fp8

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    ref_model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    ref_model.load_state_dict(model.state_dict())
    assert to_fp8(model, static=True) == 2
    x = torch.randn(4, 7, 64)
    before = model(x)  # uncalibrated: row-wise dynamic scales
    assert not model[0].calibrated
    with fp8_calibration(model) as layers:
        assert len(layers) == 2
        model(x)
    first = model[0]
    assert first.calibrated and first.input_scale.item() == pytest.approx(2 * x.abs().max().item() / FP8_MAX)
    ref = ref_model(x)
    after = model(x)
    for y in (before, after):  # two 8-bit layers in a row: about twice one layer's error (< 0.05, above)
        assert 0 < ((y - ref).norm() / ref.norm()).item() < 0.08
    # far beyond the calibration: clipped at 2x its largest magnitude (e4m3's 448 x the scale), the scale
    # unchanged; an input already at that bound gives the same product
    scale = first.input_scale.clone()
    bound = FP8_MAX * scale.item()
    assert torch.equal(first(100 * x), first((100 * x).clamp(-bound, bound)))
    assert not torch.equal(first(1.5 * x), first((1.5 * x).clamp(-bound / 2, bound / 2)))  # within it: not clipped
    assert torch.equal(first.input_scale, scale)
    lonely = Fp8Linear(torch.nn.Linear(16, 16), static=True)
    with pytest.raises(RuntimeError, match="none of the 1 static FP8 layers saw an input"):
        with fp8_calibration(lonely):
            pass
    assert not lonely.calibrated


def test_feed_forward_blocks_split_rows_evenly_and_match_the_whole(tiny_model_source):
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.attention import FeedForward

    from videogen_server.backends.svd import accel

    # the UNet's feed-forwards are the FeedForward class this wraps (spatial ff, temporal ff_in and ff)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet"))
    names = {name.rsplit(".", 1)[-1] for name, m in unet.named_modules() if isinstance(m, FeedForward)}
    assert names == {"ff", "ff_in"}
    assert accel.chunk_feed_forward(unet, 1024) == sum(isinstance(m, FeedForward) for m in unet.modules()) > 0

    torch.manual_seed(0)
    ff = FeedForward(32, activation_fn="geglu").eval()
    x = torch.randn(10, 7, 32).permute(1, 0, 2)  # 70 tokens, strided like the temporal blocks' input
    with torch.inference_mode():
        whole = ff(x)
        calls = []
        inner = ff.forward
        ff.forward = lambda h, *a, **k: (calls.append(tuple(h.shape)), inner(h, *a, **k))[1]
        assert accel.chunk_feed_forward(torch.nn.Sequential(ff), max_rows=32) == 1
        blocks = ff(x)
        assert accel.chunk_feed_forward(torch.nn.Sequential(ff), max_rows=8) == 0  # once only
    assert calls == [(24, 32), (24, 32), (22, 32)]  # ceil(70 / 32) = 3 even blocks, not 32 + 32 + 6
    assert blocks.shape == whole.shape == (7, 10, 32)
    torch.testing.assert_close(blocks, whole)
    with torch.inference_mode():
        assert ff(x[:1]).shape == (1, 10, 32) and calls[-1] == (1, 10, 32)  # small inputs go through whole


def test_channels_last_covers_the_temporal_3d_convolutions(tiny_model_source):
    from diffusers import UNetSpatioTemporalConditionModel

    from videogen_server.backends.svd import accel

    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet"))
    convs2d = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    convs3d = [m for m in unet.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs3d, "the tiny UNet has temporal blocks"
    assert accel.channels_last(unet) == len(convs2d) + len(convs3d)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs2d)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs3d)


def _unet_inputs(unet) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(2, 4, 8, 6, 8, generator=g), timestep=torch.tensor(1.0),
                encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, generator=g),
                added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2))


def test_fold_cross_attention_skips_the_query_side_and_keeps_the_output(tiny_model_source):
    import copy

    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from videogen_server.backends.svd import accel

    base = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    cross = [m for m in base.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert cross and len(cross) < sum(isinstance(m, Attention) for m in base.modules())
    x = _unet_inputs(base)
    folded = copy.deepcopy(base)
    assert accel.fold_cross_attention(folded) == len(cross)
    assert accel.fold_cross_attention(folded) == 0  # once only
    queries = []
    for m in folded.modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            m.to_q.register_forward_hook(lambda *a: queries.append(1))
            m.to_k.register_forward_hook(lambda *a: queries.append(1))
    with torch.inference_mode():
        ref = base(**x, return_dict=False)[0]
        out = folded(**x, return_dict=False)[0]
        fused = copy.deepcopy(base)
        accel.fuse_qkv(fused)  # the fused projection holds the value in its second half
        accel.fold_cross_attention(fused)
        out_fused = fused(**x, return_dict=False)[0]
    assert queries == [], "no query or key projection runs for a one-token context"
    assert torch.equal(out, ref), "float32 on CPU: the same sums, bit for bit"
    torch.testing.assert_close(out_fused, ref, rtol=1e-5, atol=1e-6)

    # any other call goes to the wrapped processor: a longer context, a mask
    torch.manual_seed(1)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8, out_bias=True).eval()
    plain, inner_calls = AttnProcessor2_0(), []

    def inner(*args, **kwargs):
        inner_calls.append(args[2].shape[1])  # the context's length
        return plain(*args, **kwargs)

    attn.set_processor(accel.OneTokenCrossAttention(inner))
    h, ctx3 = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    mask = torch.full((2, 1, 1), -1.0)  # additive, over the one key
    with torch.inference_mode():
        torch.testing.assert_close(attn(h, ctx3), plain(attn, h, ctx3))
        torch.testing.assert_close(attn(h, ctx3[:, :1], attention_mask=mask), plain(attn, h, ctx3[:, :1], mask))
        assert inner_calls == [3, 1]
        one = attn(h, ctx3[:, :1])
        assert inner_calls == [3, 1], "a one-token context without a mask is folded"
        torch.testing.assert_close(one, plain(attn, h, ctx3[:, :1]))
    assert one.shape == (2, 5, 16)


@pytest.mark.parametrize("config", [
    dict(), dict(residual_connection=True), dict(rescale_output_factor=2.0), dict(cross_attention_norm="layer_norm"),
    dict(cross_attention_norm="group_norm", cross_attention_norm_num_groups=4), dict(qk_norm="layer_norm"),
])
def test_fold_matches_each_attention_configuration_it_accepts(config):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from videogen_server.backends.svd import accel

    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8, out_bias=True, **config).eval()
    model = torch.nn.Sequential(attn)
    h, ctx = torch.randn(2, 5, 16), torch.randn(2, 1, 8)
    with torch.inference_mode():
        ref = attn(h, ctx)
        assert accel.fold_cross_attention(model) == 1
        torch.testing.assert_close(attn(h, ctx), ref, rtol=1e-5, atol=1e-6)
        # a 4-d (image-shaped) input goes to the wrapped processor
        h4 = torch.randn(2, 16, 2, 3)
        torch.testing.assert_close(attn(h4, ctx), AttnProcessor2_0()(attn, h4, ctx))


def test_fold_leaves_attention_it_cannot_fold():
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0

    from videogen_server.backends.svd import accel

    # keys from the hidden states too (added key/value projections), a processor of one's own, self-attention
    added = Attention(16, cross_attention_dim=8, heads=2, dim_head=8, added_kv_proj_dim=8,
                      processor=AttnAddedKVProcessor2_0())

    class Custom(AttnProcessor2_0):
        pass

    custom = Attention(16, cross_attention_dim=8, heads=2, dim_head=8, processor=Custom())
    plain_self = Attention(16, heads=2, dim_head=8)
    assert accel.fold_cross_attention(torch.nn.Sequential(added, custom, plain_self)) == 0
    assert not any(isinstance(m.processor, accel.OneTokenCrossAttention) for m in (added, custom, plain_self))


def test_cudnn_benchmark_is_on_while_any_holder_is_loaded():
    from videogen_server.backends.svd import accel

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        accel.use_cudnn_benchmark()
        accel.use_cudnn_benchmark()
        assert torch.backends.cudnn.benchmark
        accel.release_cudnn_benchmark()
        assert torch.backends.cudnn.benchmark, "one holder is left"
        accel.release_cudnn_benchmark()
        assert not torch.backends.cudnn.benchmark, "the setting from before comes back"
        accel.release_cudnn_benchmark()  # one release too many changes nothing
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_temporal_convs_2d_replace_every_temporal_conv_with_the_same_sums(tiny_model_source, monkeypatch):
    import copy

    from diffusers import UNetSpatioTemporalConditionModel

    from videogen_server.backends.svd import accel

    base = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    n3d = sum(type(m) is torch.nn.Conv3d for m in base.modules())
    unet = copy.deepcopy(base)
    assert accel.temporal_convs_2d(unet) == n3d > 0
    assert not any(isinstance(m, torch.nn.Conv3d) for m in unet.modules())
    assert accel.temporal_convs_2d(unet) == 0
    assert set(dict(unet.named_parameters())) == set(dict(base.named_parameters())), "parameter names stay"
    # in memory the weights lose the trailing unit dimension ([O, I, 3, 1, 1] -> [O, I, 3, 1]); state dicts
    # keep the stock form both ways: saved from the rewritten UNet, loaded into the stock one and back
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert {k: v.shape for k, v in unet.state_dict().items()} == shapes
    assert any(p.dim() == 4 and p.shape[-1] == 1 and shapes[k][-2:] == (1, 1) for k, p in unet.named_parameters())
    stock = copy.deepcopy(base)
    with torch.no_grad():
        for m in stock.modules():
            if type(m) is torch.nn.Conv3d:
                m.weight.zero_()
    stock.load_state_dict(unet.state_dict())  # strict: every key and shape fits
    again = copy.deepcopy(unet)
    with torch.no_grad():
        for m in again.modules():
            if isinstance(m, accel.FramesConv2d):
                m.weight.zero_()
    again.load_state_dict(base.state_dict())
    for k, v in base.state_dict().items():
        assert torch.equal(stock.state_dict()[k], v) and torch.equal(again.state_dict()[k], v), k
    x = _unet_inputs(base)
    with torch.inference_mode():
        ref = base(**x, return_dict=False)[0]
        torch.testing.assert_close(unet(**x, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
        # under torch.compile (fullgraph, as the server compiles the UNet), with fold_cross_attention too
        accel.fold_cross_attention(unet)
        compiled = torch.compile(unet, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(**x, return_dict=False)[0], ref, rtol=1e-4, atol=1e-5)

    # what is not a (k, 1, 1) temporal convolution stays: strides, spatial kernels, other padding modes
    keep = [torch.nn.Conv3d(4, 4, (3, 3, 3), padding=1), torch.nn.Conv3d(4, 4, (3, 1, 1), stride=(2, 1, 1)),
            torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), padding_mode="circular")]
    assert accel.temporal_convs_2d(torch.nn.Sequential(*keep)) == 0
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 4, (3, 1, 1), padding=(1, 0, 0), groups=2)
    model = torch.nn.Sequential(copy.deepcopy(conv))
    assert accel.temporal_convs_2d(model) == 1
    v = torch.randn(2, 6, 5, 3, 7).permute(0, 1, 2, 4, 3)  # a permuted (strided) view, as the UNet passes
    with torch.inference_mode():
        torch.testing.assert_close(model(v), conv(v), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(v[0]), conv(v[0]), rtol=1e-5, atol=1e-6)  # unbatched, as Conv3d takes it
        # one frame (the last chunk of 25 frames decoded in 8s): only the middle tap reads anything but
        # padding, and it runs as that tap's 1x1 convolution
        kernels = []
        real_conv2d = torch.nn.functional.conv2d
        monkeypatch.setattr(torch.nn.functional, "conv2d",
                            lambda x, w, *a, **k: kernels.append(tuple(w.shape[2:])) or real_conv2d(x, w, *a, **k))
        one = v[:, :, :1]
        torch.testing.assert_close(model(one), conv(one), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(one[0]), conv(one[0]), rtol=1e-5, atol=1e-6)
        assert kernels == [(1, 1), (1, 1)]
        model(v[:, :, :2])
        assert kernels[-1] == (3, 1), "two frames: every tap reads a frame"
        monkeypatch.undo()


@pytest.mark.timeout(600)
def test_compiled_decoder_warm_up_covers_every_chunk_length(tiny_model_source):
    """Where the frame count splits the VAE's graphs depends on size, device and options (here, on CPU
    with 2-d temporal convolutions at a small size, the convolution backend's choice split it at 2, 4, 7
    and 16 frames on the development machine), so
    the warm-up decodes every length up to the limit: no chunk length recompiles afterwards, however
    many splits fall inside the range (warming 1, 2 and the limit alone missed the middle one)."""
    import threading

    from diffusers import AutoencoderKLTemporalDecoder

    from videogen_server.backends.svd import accel

    vae = AutoencoderKLTemporalDecoder.from_pretrained(str(tiny_model_source / "1" / "vae")).eval()
    accel.temporal_convs_2d(vae.decoder)
    accel.raise_recompile_limit()  # as the backend does: earlier tests' decoders share the code object
    accel.GraphCounter.install()
    count = lambda: accel.GraphCounter.count(threading.get_ident())  # noqa: E731
    decoder = accel.CompiledDecoder(vae, "default", 16)
    with torch.inference_mode():
        latents = torch.randn(16, vae.config.latent_channels, 6, 8)
        before = count()
        assert decoder.warm(latents) and not decoder.warm(latents)
        graphs = count() - before
        for n in (5, 3, 9, 2, 16, 15, 4, 1, 12):
            frames = decoder(latents[:n])
            assert frames.shape[0] == n
        assert count() - before == graphs, "a chunk length compiled after the warm-up"
        torch.testing.assert_close(frames, vae.decode(latents[:12], num_frames=12).sample, rtol=1e-4, atol=1e-4)


def test_finalize_lets_go_of_every_model(tiny_model_source):
    """After finalize an instance holds no module or tensor (on a GPU, what it holds stays allocated):
    float16 instances keep a float32 copy of the VAE encoder besides the pipeline, which stayed."""
    from videogen_server.backends.base import InstanceContext
    from videogen_server.backends.svd.backend import SVDBackend

    backend = SVDBackend()
    backend.initialize(InstanceContext("svd-tiny", 1, tiny_model_source / "1", {"dtype": "float16"}, "cpu", 0, 1,
                                       cpu_threads=1))
    assert backend.vae_upcast, "the tiny VAE asks for float32 encoding in float16, as SVD's does"
    backend.finalize()
    held = [k for k, v in vars(backend).items() if isinstance(v, (torch.nn.Module, torch.Tensor))]
    assert not held, held


def test_a_request_cancelled_before_its_batch_runs_costs_no_device_work(tiny_model_source):
    """A request cancelled between the batch's forming and its execution is dropped before its image
    is encoded; a batch of only such requests runs nothing at all (it ran the encoders and a UNet step)."""
    from PIL import Image

    from videogen_server.backends.base import BackendRequest, InstanceContext
    from videogen_server.backends.svd.backend import SVDBackend
    from videogen_server.domain import GenerationParams
    from videogen_server.engine.admission import resolve_params
    from videogen_server.engine.model_config import GenerationDefaults, GenerationLimits

    class Sender:
        def __init__(self, cancelled: bool) -> None:
            self.cancelled, self.events = cancelled, []

        def send(self, event) -> None:
            self.events.append(type(event).__name__)

        def error(self, exc) -> None:
            self.events.append(exc)

        def is_cancelled(self) -> bool:
            return self.cancelled

        def progressed(self) -> None:
            pass

    backend = SVDBackend()
    backend.initialize(InstanceContext("svd-tiny", 1, tiny_model_source / "1", {}, "cpu", 0, 2, cpu_threads=1))
    calls = {"image_encoder": 0, "unet": 0}
    for name in calls:  # observe only: the modules run unchanged
        getattr(backend.pipe, name).register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    params = resolve_params(GenerationParams(seed=1, num_frames=2, num_inference_steps=2, width=64, height=64),
                            GenerationDefaults(), GenerationLimits())
    image = Image.new("RGB", (64, 64), (120, 60, 200))
    try:
        gone = Sender(cancelled=True)
        backend.execute([BackendRequest("gone", params, image, gone)])
        assert calls == {"image_encoder": 0, "unet": 0} and gone.events == []
        kept = Sender(cancelled=False)
        backend.execute([BackendRequest("gone", params, image, Sender(cancelled=True)),
                         BackendRequest("kept", params, image, kept)])
        assert calls == {"image_encoder": 1, "unet": 2} and kept.events[-1] == "Finished"
    finally:
        backend.finalize()


def test_an_unwritable_compile_cache_dir_is_an_error_in_the_log_not_a_model_that_never_loads(
        compile_cache, tmp_path, monkeypatch, caplog):
    """A ReadWriteMany volume that fsGroup does not reach (NFS, most file-store CSI drivers) is
    root-owned: the model failed to load and the pod never became ready (deploy review). Before that,
    Inductor failed minutes into the warm-up's first compile. Now the folder is left out, with an
    error naming the parameter, and the process compiles into its own cache. (Checked where the
    process has not picked its cache folder yet (compile_cache): the first model to set one wins.)"""
    from videogen_server.backends.svd import accel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    (tmp_path / "a-file").write_text("")
    with caplog.at_level("ERROR"):
        assert accel.use_compile_cache(str(tmp_path / "a-file" / "cache")) is False
    assert re.search(r"compile_cache_dir: .*a-file/cache is not a folder this process \(uid \d+\) can write",
                     caplog.text), caplog.text
    assert accel._cache_dir is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "before")
    assert accel.use_compile_cache(str(compile_cache)) is True  # a writable one still takes effect
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache)


def _sdpa_over_tokens_heads(q, k, v, scale):
    """What FA4's forward computes, over its [batch, tokens, heads, head_dim] layout: the stand-in for its
    kernel here (FA4 needs a Hopper or Blackwell GPU). The same SDPA call the standard processor makes."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           scale=scale)
    return out.transpose(1, 2)


@contextlib.contextmanager
def _fa4_op_on_cpu():
    """FA4's op with a CPU kernel of the same maths (`_sdpa_over_tokens_heads`), for one test: FA4 itself
    needs a Hopper GPU. Yields the list of q's shapes it is called with."""
    from videogen_server.backends.svd import accel

    op, calls = accel.fa4_attention_op(), []

    def on_cpu(q, k, v, scale):
        calls.append(q.shape)
        return _sdpa_over_tokens_heads(q, k, v, scale).contiguous()

    op.register_kernel("cpu")(on_cpu)
    op.set_kernel_enabled("cpu", True)
    try:
        yield calls
    finally:
        op.set_kernel_enabled("cpu", False)


def test_flash_attention_4_wraps_the_self_attentions_and_keeps_the_output(tiny_model_source):
    """The processor's projections, layout and output layers are the standard processor's: with FA4's kernel
    replaced by the same SDPA call over FA4's layout (FA4 itself needs a Hopper GPU), the UNet's output is
    the same bits; the kernel sees [batch, tokens, heads, head_dim] and the scale head_dim ** -0.5."""
    import copy

    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.attention_processor import Attention

    from videogen_server.backends.svd import accel

    base = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    selfs = [m for m in base.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert selfs
    calls = []

    def kernel(q, k, v, scale):
        calls.append((q.shape, scale))
        assert q.shape == k.shape == v.shape and q.dim() == 4
        return _sdpa_over_tokens_heads(q, k, v, scale)

    x = _unet_inputs(base)
    with torch.inference_mode():
        ref = base(**x, return_dict=False)[0]
        for fuse in (False, True):
            model = copy.deepcopy(base)
            if fuse:
                accel.fuse_qkv(model)
            accel.fold_cross_attention(model)  # as the backend combines them: cross folded, self through FA4
            assert accel.flash_attention_4(model, kernel) == len(selfs)
            assert accel.flash_attention_4(model, kernel) == 0  # once only
            calls.clear()
            out = model(**x, return_dict=False)[0]
            assert len(calls) == len(selfs)
            if fuse:  # one projection of three: the same products, other rounding of the GEMM's blocking
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(out, ref), "float32 on CPU: the same sums, bit for bit"
    heads = {m.heads for m in selfs}
    assert {(shape[2], scale) for shape, scale in calls} == {(h, 16 ** -0.5) for h in heads}  # tiny: head_dim 16

    # a cross-attention, a mask or a 4-d input goes to the wrapped processor
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(16, heads=2, dim_head=8, out_bias=True, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    plain, calls = AttnProcessor2_0(), []
    attn.set_processor(accel.FlashAttention4(plain, kernel))
    h = torch.randn(2, 5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(attn(h), plain(attn, h), rtol=0, atol=0)  # residual and rescale applied
        assert len(calls) == 1
        torch.testing.assert_close(attn(h, h[:, :3]), plain(attn, h, h[:, :3]))
        mask = torch.zeros(2, 1, 5)
        torch.testing.assert_close(attn(h, attention_mask=mask), plain(attn, h, attention_mask=mask))
        h4 = torch.randn(2, 16, 2, 3)
        torch.testing.assert_close(attn(h4), plain(attn, h4))
        assert len(calls) == 1


def test_flash_attention_4_leaves_attention_it_cannot_take():
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from videogen_server.backends.svd import accel

    class Custom(AttnProcessor2_0):
        pass

    cross = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    custom = Attention(16, heads=2, dim_head=8, processor=Custom())
    normed = Attention(16, heads=2, dim_head=8, qk_norm="layer_norm")
    grouped = Attention(16, heads=2, dim_head=8, norm_num_groups=4)
    wide = Attention(1024, heads=2, dim_head=512)  # the VAE's: a head size beyond FA4's 256
    odd = Attention(12, heads=1, dim_head=12)  # not a multiple of 8
    spatial = Attention(32, heads=4, dim_head=8, spatial_norm_dim=4)
    gqa = Attention(16, heads=2, kv_heads=1, dim_head=8)  # fewer key/value heads than query heads
    # the older processor scales by attn.scale (1 with scale_qk=False), not SDPA's default
    classic = Attention(16, heads=2, dim_head=8, scale_qk=False)
    assert type(classic.processor) is AttnProcessor
    models = (cross, custom, normed, grouped, wide, odd, spatial, gqa, classic)
    assert accel.flash_attention_4(torch.nn.Sequential(*models), _sdpa_over_tokens_heads) == 0
    assert not any(isinstance(m.processor, accel.FlashAttention4) for m in models)
    # on a 10.x GPU FA4 takes head sizes up to 128 (and 256): 136..248 stay on SDPA there, not on a 9.x GPU
    mid = Attention(272, heads=2, dim_head=136)
    assert accel.flash_attention_4(torch.nn.Sequential(mid), _sdpa_over_tokens_heads, accel.FA4_HEAD_DIMS[10]) == 0
    assert accel.flash_attention_4(torch.nn.Sequential(mid), _sdpa_over_tokens_heads, accel.FA4_HEAD_DIMS[9]) == 1


def test_flash_attention_4_hands_batches_beyond_its_grid_to_sdpa():
    """FA4's sm90 forward puts the batch on the grid's z dimension (65535 at most): the temporal
    attention's batch is 2 x requests x latent pixels, past it at 1024x576 with 4 requests."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from videogen_server.backends.svd import accel

    assert accel.FA4_MAX_BATCH == 65535
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    calls = []

    def kernel(q, k, v, scale):
        calls.append(q.shape[0])
        return _sdpa_over_tokens_heads(q, k, v, scale)

    attn.set_processor(accel.FlashAttention4(AttnProcessor2_0(), kernel, max_batch=4))
    with torch.inference_mode():
        small, large = torch.randn(4, 3, 16), torch.randn(5, 3, 16)
        torch.testing.assert_close(attn(small), AttnProcessor2_0()(attn, small), rtol=0, atol=0)
        torch.testing.assert_close(attn(large), AttnProcessor2_0()(attn, large), rtol=0, atol=0)
    assert calls == [4]


def test_fa4_op_states_its_output_without_running():
    """What torch.compile plans with: the fake's output is shaped, typed and laid out as FA4's (a new
    contiguous tensor like q, in q's dtype), for 16-bit inputs and strided views of a fused projection."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from videogen_server.backends.svd import accel

    op = accel.fa4_attention_op()
    with FakeTensorMode():
        for dtype in (torch.float16, torch.bfloat16):
            qkv = torch.empty(2, 7, 3 * 4 * 64, dtype=dtype)
            q, k, v = (t.view(2, 7, 4, 64) for t in qkv.chunk(3, dim=-1))
            out = op(q, k, v, 0.125)
            assert out.shape == (2, 7, 4, 64) and out.dtype == dtype and out.is_contiguous()


@pytest.mark.timeout(600)  # Inductor compiles the tiny UNet once: ~1 min on 2 busy cores
def test_flash_attention_4_op_compiles_whole_into_the_unet_graph(tiny_model_source, tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) of the UNet with FA4's custom op: Dynamo keeps the op whole (it cannot
    trace the CuTe DSL), Inductor plans its output from the op's fake (shape and strides) and calls it.
    The op's CUDA kernel is FA4's; a CPU kernel of the same maths is registered for this test only."""
    import copy

    from diffusers import UNetSpatioTemporalConditionModel

    from videogen_server.backends.svd import accel

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert accel.fa4_attention_op() is accel.fa4_attention_op()  # registered once per process
    base = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    model = copy.deepcopy(base)
    n = accel.flash_attention_4(model)  # the real op
    x = _unet_inputs(base)
    torch._dynamo.reset()
    try:
        with _fa4_op_on_cpu() as ran, torch.inference_mode():
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            ref = base(**x, return_dict=False)[0]
            out = compiled(**x, return_dict=False)[0]
            ran.clear()
            again = compiled(**x, return_dict=False)[0]
    finally:
        torch._dynamo.reset()
    assert len(ran) == n, "every wrapped self-attention calls the op from the compiled graph"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, out)


def test_fa4_attention_kernel_needs_a_hopper_or_blackwell_gpu(make_repo):
    repo = make_repo({"m": tiny_config("m", parameters=TINY_PARAMETERS + _param("attention_kernel", "fa4")),
                      "bad": tiny_config("bad", parameters=TINY_PARAMETERS + _param("attention_kernel", "fa3"))})
    with ServerThread(repo) as server:
        for name in ("m", "bad"):
            info = server.stub().GetModel(pb.GetModelRequest(name=name))
            assert info.state != pb.MODEL_STATE_READY
        assert "attention_kernel: fa4 needs a CUDA GPU of compute capability 9.x or 10.x" in \
            server.engine.models["m"].error
        assert "attention_kernel: 'fa3' is not one of ['sdpa', 'fa4']" in server.engine.models["bad"].error


@pytest.mark.parametrize("shape, groups", [((2, 64, 8, 8), 16), ((2, 32, 3, 4, 5), 8), ((2, 32, 7), 4), ((3, 12), 3)])
def test_split_group_norm_is_the_group_norm_from_channel_statistics(shape, groups, tmp_path, monkeypatch):
    """Image (channels-last too), video (the temporal blocks' [B, C, F, H, W]), sequence (an attention's
    group norm) and pixel-less inputs, with a mean far from zero (the per-group combination of channel
    statistics must not lose precision to it); the module keeps its parameters; eager and compiled."""
    import copy

    from videogen_server.backends.svd import accel

    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(groups, shape[1], eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    model = torch.nn.Sequential(copy.deepcopy(ref))
    before = dict(model.named_parameters())
    assert accel.split_group_norm(model) == 1 and accel.split_group_norm(model) == 0
    assert isinstance(model[0], accel.SplitGroupNorm)
    assert dict(model.named_parameters()) == before  # the same names, the same tensors
    x = torch.randn(*shape) * 3 + 50
    inputs = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    exact = copy.deepcopy(ref).double()(x.double()).float()  # (torch's own CPU kernel is off by 2e-4 on a
    with torch.inference_mode():                             # channels-last input of this mean: not the bar)
        for xx in inputs:
            torch.testing.assert_close(model(xx), exact, rtol=0, atol=1e-5)
        bf16 = x.to(torch.bfloat16)  # 16-bit input: float32 statistics, 16-bit output, as torch's kernel
        out = copy.deepcopy(model).to(torch.bfloat16)(bf16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, copy.deepcopy(ref).to(torch.bfloat16)(bf16), rtol=0.02, atol=0.02)
        no_affine = torch.nn.Sequential(torch.nn.GroupNorm(groups, shape[1], affine=False))
        plain = no_affine.double()(x.double()).float()
        accel.split_group_norm(no_affine.float())
        torch.testing.assert_close(no_affine(x), plain, rtol=0, atol=1e-5)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(inputs[-1]), exact, rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.timeout(600)
def test_a_model_with_fa4_serves_the_frames_of_the_plain_model(make_repo, monkeypatch):
    """attention_kernel fa4 through a real server, with fuse_qkv and fold_cross_attention as a user would
    combine them: the backend applies FA4 after the fusion, every self-attention calls the op, and the
    frames are the plain model's. FA4 needs a Hopper GPU: the device check is passed over and the op given
    a CPU kernel of the same maths, for this test only; the rest is the server's own path."""
    from videogen_server.backends.svd import accel

    monkeypatch.setattr(accel, "fa4_unavailable", lambda device, dtype: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with _fa4_op_on_cpu() as calls:
        repo = make_repo({
            "plain": tiny_config("plain"),
            "fa4": tiny_config("fa4", parameters=TINY_PARAMETERS + _param("attention_kernel", "fa4")
                               + _param("fuse_qkv", "true") + _param("fold_cross_attention", "true")),
        })
        with ServerThread(repo) as server:
            unet = next(iter(server.engine.models["fa4"].loaded.values())).instances[0].backend.pipe.unet
            wrapped = [m for m in unet.modules() if isinstance(getattr(m, "processor", None), accel.FlashAttention4)]
            assert wrapped and all(m.processor.fused for m in wrapped)
            for case in CASES:
                calls.clear()
                fa4 = _frames(server, "fa4", **case)
                assert calls, "the op ran"
                assert np.abs(fa4 - _frames(server, "plain", **case)).max() <= 1


def test_fa4_kernels_are_kept_beside_the_compile_cache(tmp_path, monkeypatch):
    """With compile_cache_dir, FA4's compiled kernels go to <dir>/fa4 (its own disk cache, off by default),
    set before FA4's import, which reads it once; an operator's own setting is kept."""
    import sys

    from videogen_server.backends.svd import accel

    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", raising=False)
    monkeypatch.delitem(sys.modules, accel.FA4_MODULE, raising=False)
    assert accel.keep_fa4_kernels(tmp_path / "a")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "a")
    assert not accel.keep_fa4_kernels(tmp_path / "b")  # the first folder stays
    monkeypatch.setitem(sys.modules, accel.FA4_MODULE, object())  # imported: its setting is fixed
    assert accel.keep_fa4_kernels(tmp_path / "a") and not accel.keep_fa4_kernels(tmp_path / "c")
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")  # the operator turned it off
    monkeypatch.delitem(sys.modules, accel.FA4_MODULE)
    assert not accel.keep_fa4_kernels(tmp_path / "a")


@pytest.mark.timeout(600)  # a cold compile of the tiny UNet: ~1 min on 2 busy cores
@pytest.mark.parametrize("how", ["transposed", "phases"])
def test_fold_upsample_is_the_convolution_of_the_upsampled_input(how, tiny_model_source, tmp_path, monkeypatch):
    """Nearest 2x then a 3x3 convolution, as one convolution of the source: the same sums in float64 (odd
    sizes, one pixel, channels-last, no bias); the tiny UNet and VAE decoder keep their outputs, names
    and state dicts, eager and compiled; an explicit output size that is not 2x runs the stock code."""
    import copy

    import torch.nn.functional as F
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from diffusers.models.upsampling import Upsample2D

    from videogen_server.backends.svd import accel

    torch.manual_seed(0)
    for n, c, h, w, bias in [(3, 16, 7, 9, True), (1, 4, 1, 1, True), (2, 8, 2, 5, False)]:
        x = torch.randn(n, c, h, w, dtype=torch.float64)
        weight, b = torch.randn(5, c, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64) if bias else None
        ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, b, padding=1)
        for xx in (x, x.to(memory_format=torch.channels_last)):
            out = accel.upsample_conv(xx, weight, b, how)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            if c > 1 and h * w > 1:  # the input's layout (unambiguous here), as the stock convolution keeps it
                nhwc = not xx.is_contiguous()
                assert out.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    with pytest.raises(ValueError, match="fold_upsample: 'nearest' is not one of"):
        accel.upsample_conv(x, weight, b, "nearest")
    # 16-bit, as on a GPU: the folded taps in the weights' dtype, within the rounding of another algorithm
    for dtype in (torch.float16, torch.bfloat16):
        x16, w16, b16 = (t.to(dtype) for t in (torch.randn(2, 32, 5, 6), torch.randn(8, 32, 3, 3) / 17,
                                                 torch.randn(8)))
        out = accel.upsample_conv(x16, w16, b16, how)
        exact = F.conv2d(F.interpolate(x16.double(), scale_factor=2.0, mode="nearest"), w16.double(), b16.double(),
                         padding=1)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=0.05 if dtype == torch.bfloat16 else 0.01)

    base = UNetSpatioTemporalConditionModel.from_pretrained(str(tiny_model_source / "1" / "unet")).eval()
    vae = AutoencoderKLTemporalDecoder.from_pretrained(str(tiny_model_source / "1" / "vae")).eval()
    unet, folded_vae = copy.deepcopy(base), copy.deepcopy(vae)
    stock = sum(type(m) is Upsample2D for m in base.modules())
    assert accel.fold_upsample(unet, how) == stock > 0 and accel.fold_upsample(unet, how) == 0
    assert accel.fold_upsample(folded_vae.decoder, how) == sum(type(m) is Upsample2D for m in vae.modules()) > 0
    assert not any(type(m) is Upsample2D for m in (*unet.modules(), *folded_vae.decoder.modules()))
    for a, b_ in ((unet, base), (folded_vae, vae)):
        assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == \
            {k: (v.shape, v.dtype) for k, v in b_.state_dict().items()}, "names, shapes and dtypes stay"
    x = _unet_inputs(base)
    odd = dict(x, sample=x["sample"][..., :5, :])  # 5 latent rows: the UNet upsamples to 5, not 2 x 3
    z = torch.randn(4, 4, 6, 8)
    calls, real = [], accel.upsample_conv
    monkeypatch.setattr(accel, "upsample_conv", lambda *a: calls.append(a[-1]) or real(*a))
    with torch.inference_mode():
        for inputs in (x, odd):
            torch.testing.assert_close(unet(**inputs, return_dict=False)[0], base(**inputs, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)
        assert calls == [how], "one folded call for the even size; the odd one ran the stock code"
        ref_frames = vae.decode(z, num_frames=4).sample
        torch.testing.assert_close(folded_vae.decode(z, num_frames=4).sample, ref_frames, rtol=1e-5, atol=1e-5)
        assert calls == [how, how]
        up = next(m for m in unet.modules() if hasattr(m, "fold"))
        source = torch.randn(1, up.channels, 3, 5)
        up(source, output_size=(6, 10))  # an output size given, twice the input's: still folded
        assert calls == [how, how, how]
        monkeypatch.undo()
        import pickle
        again = pickle.loads(pickle.dumps(unet))  # a folded model pickles (torch.save) and keeps its fold
        assert [m.fold for m in again.modules() if hasattr(m, "fold")] == [how]
        torch.testing.assert_close(again(**x, return_dict=False)[0], unet(**x, return_dict=False)[0], rtol=0, atol=0)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
        torch._dynamo.reset()
        try:  # under torch.compile (fullgraph, as the server compiles the UNet)
            compiled = torch.compile(unet, fullgraph=True, dynamic=False)
            torch.testing.assert_close(compiled(**x, return_dict=False)[0], base(**x, return_dict=False)[0],
                                       rtol=1e-4, atol=1e-5)
        finally:
            torch._dynamo.reset()
    # what is not a plain nearest-2x + 3x3 convolution stays
    keep = [Upsample2D(4, use_conv=True, kernel_size=5, padding=2), Upsample2D(4, use_conv=False),
            Upsample2D(4, use_conv_transpose=True), Upsample2D(4, use_conv=True, interpolate=False),
            Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
            Upsample2D(4, use_conv=True), Upsample2D(4, use_conv=True)]
    keep[-2].conv.padding_mode = "reflect"  # not the zeros the fold assumes
    keep[-1].conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)
    assert accel.fold_upsample(torch.nn.Sequential(*keep), how) == 0
    from videogen_server.backends.svd.backend import SVDBackend
    with pytest.raises(ValueError, match=r"fold_upsample: 'true' is not one of \['false', 'transposed', 'phases'\]"):
        SVDBackend.validate_parameters({"fold_upsample": "true"})

