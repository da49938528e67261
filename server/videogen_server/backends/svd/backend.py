"""The Stable Video Diffusion backend on diffusers' real components.

It runs the same computation as `StableVideoDiffusionPipeline.__call__` (same helpers, same order
of random draws) but keeps every per-call state local to the call: a fresh scheduler per batch,
guidance tensors per request, and a separate float32 copy of the VAE encoder instead of flipping
the shared VAE's dtype. Denoising is batched across requests; each request keeps its own random
generator, conditioning and decode chunking, and its frames go out chunk by chunk as decoded.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import logging as transformers_logging

from ...errors import OutOfMemory
from ...domain import ResolvedParams
from ..base import (COMPILE_ARTIFACTS_FOLDER, Backend, BackendRequest, Finished, FramesDecoded, InstanceContext,
                    ModelSettingError, PhaseTiming, StepDone, is_fatal_device_error, is_out_of_memory)
from . import accel, preprocess

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNWARMED_SHAPES = ("eager", "compile")
ATTENTION_KERNELS = ("sdpa", "fa4")
FOLD_UPSAMPLE = ("false",) + accel.UPSAMPLE_FOLDS
FALLBACK_LOG_LIMIT = 100  # distinct shapes whose uncompiled run is logged, per instance
#: `fp8: static`: eager denoising steps of the first batch that calibrate the activation scales (a schedule
#: of its own over the same sigma range: from noise to nearly clean, where activations differ most)
FP8_CALIBRATION_STEPS = 4
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# from_pretrained is not thread-safe: accelerate's empty-weights init patches torch.nn.Module globally,
# so two instances loading at once (or one loading while another builds modules) can end up with meta
# tensors. Loads and module surgery take turns; serving does not.
_LOAD_LOCK = threading.Lock()
BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
# torch's intra-op thread count (libgomp) is per thread, and libgomp throttles the spin-waiting of every
# team once the process holds more of its threads than there are cores. A preprocessing thread that ran
# one parallel op with the default team made a 2-core instance's steps ~35% slower, for good. So
# intra-op parallelism belongs to the instance threads alone: `prepare` for a CPU instance runs
# single-threaded, and each instance sets its own count (torch.set_num_threads also changes the count
# new threads start with).
_single_threaded = threading.local()
# The CLIP resize's blur (diffusers' `_resize_with_antialiasing`) in multiply-adds, up to which the
# backend runs diffusers' own code: ~0.15 s on one core here, images up to about 1280x720. Larger ones
# (or long thin ones, whose blur kernel grows with the scale) take preprocess.clip_resize.
EXACT_CLIP_RESIZE_MAX_COST = 64_000_000
# forward_chunking's smallest block: smaller blocks make GEMMs too small to keep the GPU busy, and a
# compiled UNet unrolls one call per block (a block of 2 tokens: ~230k calls per top-level layer)
MIN_BLOCK_ROWS = 1024


@functools.cache
def _default_threads() -> int:
    """torch's intra-op thread count as the process started (before any thread changed it)."""
    return torch.get_num_threads()

#: Backend parameters (config.pbtxt `parameters`), each with its default and meaning.
PARAMETERS = {
    "dtype": ("float16 on GPU, float32 on CPU", "weights and activations: float32 | float16 | bfloat16"),
    "variant": ("", "weights variant to load, e.g. fp16 for the *.fp16.safetensors files"),
    "compile": ("none", "torch.compile mode for the UNet (fullgraph, static shapes: one graph per width x height x "
                "frames x batch size, built by the warm-up requests): " + " | ".join(COMPILE_MODES)),
    "compile_vae": ("none", "torch.compile mode for the VAE decoder, with a dynamic frame dimension: the first "
                    "request at a size builds the graphs of every chunk length up to max_decode_chunk_size: "
                    + " | ".join(COMPILE_MODES)),
    "unwarmed_shapes": ("eager", "what a compiled model does, once warmed up, with a shape its warm-up did not compile "
                        "(another size, frame count or batch size, a batch shrunk by a cancellation, or a request "
                        "without guidance, which halves the UNet's batch): eager runs that phase (denoising or VAE "
                        "decode) uncompiled, at eager speed, and counts it in videogen_eager_fallbacks_total | "
                        "compile builds its graph while serving (minutes on a GPU, with the instance's queue "
                        "waiting) and counts it in videogen_recompiles_total. Past torch's recompile limit a "
                        "shape runs eager either way"),
    "fp8": ("false", "UNet linear layers as FP8 e4m3 matrix products with per-channel weight scales: true | "
            "dynamic (activations scaled per row at run time) | static (one scale per layer, calibrated on "
            f"{FP8_CALIBRATION_STEPS} eager denoising steps of the first request, a warm-up's, before any "
            "compile) | false; GPUs of compute capability 8.9+ (Ada, Hopper); changes frames slightly"),
    "fuse_qkv": ("false", "one projection for attention query/key/value instead of three"),
    "attention_backend": ("auto", "scaled-dot-product attention kernel to prefer (the others remain for calls it "
                          "cannot take), process-wide: " + " | ".join(accel.SDPA_BACKENDS)),
    "attention_kernel": ("sdpa", "the UNet's self-attentions: sdpa (torch's scaled_dot_product_attention, the kernel "
                         "attention_backend prefers) | fa4 (FlashAttention-4, the flash-attn-4 package: GPUs of "
                         "compute capability 9.x or 10.x, float16 or bfloat16; this model only). Cross-attention "
                         "and the VAE's attention stay on SDPA; exact attention either way, the frames differ by "
                         "float rounding"),
    "cudnn_benchmark": ("false", "cuDNN times its convolution algorithms for each new shape and keeps the fastest "
                        "(torch.backends.cudnn.benchmark), process-wide while this model is loaded; the first request "
                        "of a shape (size, frames, decode chunk length) pays the timing: warm them up. The choice is "
                        "made by timing, so frames may differ by float rounding between restarts"),
    "cpu_offload": ("false", "low-memory mode: models live in pinned host memory and move to the GPU for their "
                    "phase only (image encoder, then UNet, which leaves before the VAE decode); with compile, only "
                    "the modes without CUDA graphs (default, max-autotune-no-cudagraphs)"),
    "forward_chunking": ("false", "UNet feed-forward layers over blocks of tokens (lower peak memory): true "
                         f"({accel.FF_BLOCK_ROWS} tokens a block) | false | tokens per block (>= {MIN_BLOCK_ROWS})"),
    "channels_last": ("false", "the UNet's and VAE's convolution weights channels-last (NHWC; NDHWC for the "
                      "temporal 3-d ones, unless temporal_convs_2d made them 2-d)"),
    "fold_cross_attention": ("false", "the UNet's cross-attention over the one image-embedding token computed as what "
                             "it equals, the value projection of that token for every position (no query projection, "
                             "no softmax); the same frames up to float rounding"),
    "temporal_convs_2d": ("false", "the temporal (3x1x1) 3-d convolutions of the UNet and the VAE decoder as the "
                          "equivalent (3x1) 2-d convolutions over frames x pixels, which torch.compile keeps "
                          "channels-last like the spatial ones; the same frames up to float rounding"),
    "split_group_norm": ("false", "the UNet's and the VAE decoder's group norms computed from per-channel statistics "
                         "combined per group: the same maths (frames equal up to float rounding), in a form whose "
                         "reduction reads channels-last tensors (what torch.compile makes of the convolutions "
                         "around them) along their contiguous channels; for compiled models"),
    "fold_upsample": ("false", "each nearest-2x upsampling of the UNet and the VAE decoder with the 3x3 convolution "
                      "after it computed as one convolution of the source, without the upsampled tensor and with "
                      "16 of its 36 multiply-adds a source pixel: false | transposed (a stride-2 transposed "
                      "convolution) | phases (one 2x2 convolution giving the four output phases, interleaved); "
                      "the same frames up to float rounding"),
    "fused_geglu": ("false", "each GEGLU feed-forward input layer of the UNet (48 in SVD-XT) as one Triton kernel "
                    "computing value * gelu(gate) from the input, without writing its projection's output (twice "
                    "as wide as the result) and reading it back; float16/bfloat16 on a GPU with Triton, projections "
                    "made FP8 stay as they are; the same frames up to float rounding"),
    "fault_injection": ("", "testing only: `oom@K`, `error@K` or `lost@K` raises a device out-of-memory error, a "
                        "RuntimeError or a CUDA error that leaves the device unusable (the instance stops for good) "
                        "at denoising step K, for requests whose seed is the one after `:seed=` (e.g. oom@2:seed=666); "
                        "`hang@K` stops there for good, sending nothing (a call that never returns: its thread is "
                        "never freed; for --instance-stall-seconds)"),
    "compile_options": ("", "extra Inductor options for compile and compile_vae, `key=value;key=value` (e.g. "
                        "conv_1x1_as_mm=true;coordinate_descent_tuning=true), over the mode's own"),
    "compile_vae_options": ("", "Inductor options for compile_vae only, over compile_options (same form), e.g. "
                            "force_layout_optimization=true: channels-last convolutions in the VAE decoder, which "
                            "Inductor leaves off for graphs with a dynamic dimension"),
    "compile_cache_dir": ("", "persistent torch.compile cache (Inductor FX graphs, AOTAutograd, Triton kernels) so a "
                          "restart does not compile from scratch; process-wide, first model to set it wins"),
}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """CPU tensors of one request's conditioning image: CLIP pixel values and the VAE's input."""

    clip: torch.Tensor
    vae: torch.Tensor


def _scheduler(config, steps: int, device: torch.device) -> EulerDiscreteScheduler:
    """A fresh scheduler set to `steps`, its timesteps float32 whatever torch's default dtype is just now.

    diffusers builds SVD's timesteps (continuous, v-prediction) with `torch.Tensor([...])`, in torch's
    default dtype, and a from_pretrained in float16 sets that default process-wide for the length of its
    instantiation: such a load beside a request in flight gave that request float16 timesteps, other
    frames than its seed makes. This backend loads in float32 now (see initialize), but another backend
    of the process may not. Rebuilt here from the float32 sigmas with the same operations, one by one,
    so that the values are the same bits the pipeline gets."""
    scheduler = EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps, device=device)
    if scheduler.config.timestep_type == "continuous" and scheduler.config.prediction_type == "v_prediction":
        # on the device, as diffusers computes them (its sigmas are moved to the CPU afterwards)
        scheduler.timesteps = torch.stack([0.25 * sigma.log() for sigma in scheduler.sigmas[:-1].to(device)])
    return scheduler


def _fp8_mode(value: str) -> str:
    """The `fp8` parameter: "" (off), "dynamic" or "static"; true means dynamic."""
    mode = value.lower()
    if mode in ("dynamic", "static"):
        return mode
    try:
        return "dynamic" if BOOL[mode] else ""
    except KeyError:
        raise ValueError(f"fp8: {value!r} is not true, false, dynamic or static") from None


def _bool(key: str, value: str) -> bool:
    try:
        return BOOL[value.lower()]
    except KeyError:
        raise ValueError(f"{key}: {value!r} is not a boolean (true/false)") from None


class SVDBackend(Backend):
    name = "svd"

    @classmethod
    def validate_parameters(cls, parameters: Mapping[str, str]) -> None:
        for key, value in parameters.items():
            if key not in PARAMETERS:
                raise ValueError(f"{key}: unknown parameter; the svd backend takes {sorted(PARAMETERS)} "
                                 "besides default_* and limits")
            if key == "dtype" and value not in DTYPES:
                raise ValueError(f"dtype: {value!r} is not one of {sorted(DTYPES)}")
            if key in ("compile", "compile_vae") and value not in COMPILE_MODES:
                raise ValueError(f"{key}: {value!r} is not one of {list(COMPILE_MODES)}")
            if key == "attention_backend" and value not in accel.SDPA_BACKENDS:
                raise ValueError(f"attention_backend: {value!r} is not one of {list(accel.SDPA_BACKENDS)}")
            if key == "attention_kernel" and value not in ATTENTION_KERNELS:
                raise ValueError(f"attention_kernel: {value!r} is not one of {list(ATTENTION_KERNELS)}")
            if key == "fp8":
                _fp8_mode(value)
            if key in ("cpu_offload", "channels_last", "fuse_qkv", "fold_cross_attention", "temporal_convs_2d",
                       "cudnn_benchmark", "split_group_norm", "fused_geglu"):
                _bool(key, value)
            if key == "fold_upsample" and value not in FOLD_UPSAMPLE:
                raise ValueError(f"fold_upsample: {value!r} is not one of {list(FOLD_UPSAMPLE)}")
            if key == "forward_chunking":
                _block_rows(value)
            if key == "fault_injection":
                _parse_fault(value)
            if key in ("compile_options", "compile_vae_options"):
                accel.parse_compile_options(value, key)
            if key == "unwarmed_shapes" and value not in UNWARMED_SHAPES:
                raise ValueError(f"unwarmed_shapes: {value!r} is not one of {list(UNWARMED_SHAPES)}")
        offload = _bool("cpu_offload", parameters.get("cpu_offload", "false"))
        mode = parameters.get("compile", "none")
        if offload and mode in CUDA_GRAPH_MODES:
            # a CUDA graph replays the device addresses it captured, and the offloaded UNet's weights move
            # to new ones every request (the VAE stays on the device: compile_vae takes any mode)
            raise ValueError(f"compile: {mode!r} records CUDA graphs, which cannot be combined with cpu_offload (the "
                             f"UNet's weights move every request); use default or max-autotune-no-cudagraphs")
        options = accel.parse_compile_options(parameters.get("compile_options", ""))
        if offload and mode != "none" and options.get("triton.cudagraphs") in (True, 1):
            raise ValueError("compile_options: triton.cudagraphs cannot be combined with cpu_offload")

    @classmethod
    def model_defaults(cls, version_path: Path) -> Mapping[str, Any]:
        """num_frames from the UNet's config, as the pipeline's default does."""
        try:
            unet = json.loads((version_path / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return {"num_frames": int(unet["num_frames"])} if "num_frames" in unet else {}

    def initialize(self, context: InstanceContext) -> None:
        p = context.parameters
        if context.compile_artifacts_out is not None:  # `compile-artifacts`: fail in seconds, not after the compile
            if p.get("compile", "none") == "none" and p.get("compile_vae", "none") == "none":
                raise ModelSettingError("compile: this model compiles nothing (compile and compile_vae are none), so it has "
                                 "no compile artifacts to write")
            accel.check_writable(context.compile_artifacts_out)
        self.device = torch.device(context.device)
        on_gpu = self.device.type == "cuda"
        with _LOAD_LOCK:  # the default is read before any instance thread changes what new threads start with
            default_threads = _default_threads()
            torch.set_num_threads(context.cpu_threads if context.cpu_threads and not on_gpu else default_threads)
        if on_gpu and self.device.index is not None:  # the instance thread's current device (per host thread): its streams, graphs and events
            torch.cuda.set_device(self.device)
        self.dtype = DTYPES[p.get("dtype", "float16" if on_gpu else "float32")]
        t0 = time.perf_counter()
        diffusers_logging.disable_progress_bar()  # a server logs lines, not progress bars
        transformers_logging.disable_progress_bar()
        applied = []
        self.fp8 = _fp8_mode(p.get("fp8", "false"))
        if self.fp8:
            why_not = accel.fp8_supported(self.device)
            if why_not:
                raise ModelSettingError(f"fp8: {why_not}")
        fuse_geglu = _bool("fused_geglu", p.get("fused_geglu", "false"))
        if fuse_geglu:  # before the weights load: fails in seconds
            why_not = accel.fused_geglu_unavailable(self.device, self.dtype)
            if why_not:
                raise ModelSettingError(f"fused_geglu: {why_not}")
        self.attention_kernel = p.get("attention_kernel", "sdpa")
        if self.attention_kernel == "fa4":  # before the weights load: a missing package fails in seconds
            if p.get("compile_cache_dir") and on_gpu:  # before FA4's import, which reads it
                accel.keep_fa4_kernels(Path(p["compile_cache_dir"]) / "fa4")
            why_not = accel.fa4_unavailable(self.device, self.dtype)
            if why_not:
                raise ModelSettingError(f"attention_kernel: fa4 {why_not}")
        with _LOAD_LOCK:  # the module surgery too: it creates modules, which a concurrent load may patch
            # Loaded in float32, then cast: from_pretrained sets torch's default dtype (process-wide) to the
            # one it is given while it builds each model, and a float16 window there reached the instances
            # around it. A compiled model's every graph is guarded on the default dtype, so serving ones
            # compiled again inside a request; a compile spanning the window put float16 back as the
            # default for good. The cast gives the same bits (float16 to float32 and back is exact) at
            # the price of a float32 copy in host memory while loading (~9 GB for SVD-XT).
            pipe = StableVideoDiffusionPipeline.from_pretrained(
                str(context.version_path), dtype=torch.float32, use_safetensors=True,
                variant=p.get("variant") or None)
            if self.dtype != torch.float32:
                pipe.to(dtype=self.dtype)
            if _bool("fuse_qkv", p.get("fuse_qkv", "false")):
                applied.append(f"fuse_qkv ({accel.fuse_qkv(pipe.unet)} attention layers)")
            if self.fp8:
                applied.append(f"fp8 {self.fp8} ({accel.to_fp8(pipe.unet, static=self.fp8 == 'static')} linear "
                               "layers)")
            self.fp8_uncalibrated = self.fp8 == "static"  # calibrated at the first batch (a warm-up's)
            if _bool("fold_cross_attention", p.get("fold_cross_attention", "false")):  # after fuse_qkv and fp8
                applied.append(f"fold_cross_attention ({accel.fold_cross_attention(pipe.unet)} layers)")
            if self.attention_kernel == "fa4":  # after fuse_qkv
                head_dims = accel.FA4_HEAD_DIMS[torch.cuda.get_device_capability(self.device)[0]]
                applied.append(f"attention_kernel fa4 ({accel.flash_attention_4(pipe.unet, head_dims=head_dims)} "
                               "self-attentions)")
            if _bool("temporal_convs_2d", p.get("temporal_convs_2d", "false")):  # before channels_last
                n_unet, n_vae = accel.temporal_convs_2d(pipe.unet), accel.temporal_convs_2d(pipe.vae.decoder)
                applied.append(f"temporal_convs_2d ({n_unet} UNet, {n_vae} VAE decoder convolutions)")
            if _bool("split_group_norm", p.get("split_group_norm", "false")):
                n_unet, n_vae = accel.split_group_norm(pipe.unet), accel.split_group_norm(pipe.vae.decoder)
                applied.append(f"split_group_norm ({n_unet} UNet, {n_vae} VAE decoder group norms)")
            fold = p.get("fold_upsample", "false")
            if fold != "false":
                n_unet, n_vae = accel.fold_upsample(pipe.unet, fold), accel.fold_upsample(pipe.vae.decoder, fold)
                applied.append(f"fold_upsample {fold} ({n_unet} UNet, {n_vae} VAE decoder upsamplers)")
            if fuse_geglu:  # after fp8: FP8 projections stay as they are
                applied.append(f"fused_geglu ({accel.fused_geglu(pipe.unet)} GEGLU layers)")
        pipe.set_progress_bar_config(disable=True)
        rows = _block_rows(p.get("forward_chunking", "false"))
        if rows:
            n = accel.chunk_feed_forward(pipe.unet, rows)
            applied.append(f"forward_chunking ({n} feed-forward layers, {rows} tokens a block)")
        if _bool("channels_last", p.get("channels_last", "false")):
            n = accel.channels_last(pipe.unet) + accel.channels_last(pipe.vae)
            applied.append(f"channels_last ({n} convolutions)")
        self.offload = None
        if _bool("cpu_offload", p.get("cpu_offload", "false")):  # after every change to the weights: it keeps the host copies
            if not on_gpu:
                raise ModelSettingError("cpu_offload: needs a GPU instance")
            pipe.vae.to(self.device)  # small; the decode needs it every request
            self.offload = accel.PhaseOffload({"image_encoder": pipe.image_encoder, "unet": pipe.unet}, self.device)
            applied.append("cpu_offload")
        else:
            pipe.to(self.device)
        self.pipe = pipe
        # what `prepare` needs, kept past finalize: admission may still be preprocessing for this instance
        self.video_processor, self.feature_extractor = pipe.video_processor, pipe.feature_extractor
        # The pipeline flips the whole VAE to float32 for the image encode when it runs in float16
        # (force_upcast) and back afterwards: shared mutable state, and a weight copy per call. We keep
        # a float32 copy of the encoder half instead; same numbers, no flip.
        self.vae_upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if self.vae_upcast:
            # On the device even under cpu_offload, as the VAE is; the encoder half is ~140 MB in float32.
            self.vae_encoder32 = copy.deepcopy(pipe.vae.encoder).to(self.device, torch.float32)
            self.vae_quant_conv32 = copy.deepcopy(pipe.vae.quant_conv).to(self.device, torch.float32)
        self.scheduler_config = pipe.scheduler.config
        self.fault = _parse_fault(p.get("fault_injection", ""))
        self.compile_mode = p.get("compile", "none")
        self.compile_vae_mode = p.get("compile_vae", "none")
        self.decoder = None
        self.thread = threading.get_ident()  # the instance thread: initialize, warm-up and serving
        self.graphs_after_warmup = None
        self.instance_name = f"{context.model_name}/{context.model_version}#{context.instance_index}"
        self.artifacts_folder = context.version_path / COMPILE_ARTIFACTS_FOLDER
        self.artifacts_out = context.compile_artifacts_out
        self.artifacts_loaded = False
        self.unwarmed_shapes = p.get("unwarmed_shapes", "eager")
        self.unet_shapes: set[tuple[int, ...]] = set()  # the UNet input shapes compiled (by the warm-up)
        self.eager_fallbacks = 0  # phases of a batch run uncompiled since their shape was not warmed up
        self.batches_split = 0  # batches that ran out of device memory, then ran request by request
        self._fallback_phases: set[str] = set()  # this batch's
        self._fallbacks_logged: set[tuple] = set()  # (phase, shape), up to FALLBACK_LOG_LIMIT
        self._over_limit: set[tuple] = set()  # (phase, shape) Dynamo refused to compile: its recompile limit
        if self.compile_mode != "none" or self.compile_vae_mode != "none":
            accel.GraphCounter.install()
            self.graphs_before = accel.GraphCounter.count(self.thread)  # a reused thread id may have counts
            accel.raise_recompile_limit()
            if p.get("compile_cache_dir"):
                accel.use_compile_cache(p["compile_cache_dir"])
            # before anything compiles: the graphs and kernels of another machine like this one
            loaded = accel.load_compile_artifacts(self.artifacts_folder, self.device,
                                                  warn_missing=self.artifacts_out is None)  # not when building them
            if loaded:
                applied.append(loaded[0])
                self.artifacts_loaded = loaded[1]
            self.lookups_before = accel.GraphCounter.lookups(self.thread)
        options = accel.parse_compile_options(p.get("compile_options", ""))
        vae_only = accel.parse_compile_options(p.get("compile_vae_options", ""), "compile_vae_options")
        accel.check_compile_options(options, "compile_options")  # both before any compile: typos name their key
        accel.check_compile_options(vae_only, "compile_vae_options")
        vae_options = {**options, **vae_only}
        for key, mode, opts in (("compile", self.compile_mode, options),
                                ("compile_vae", self.compile_vae_mode, vae_options)):
            if on_gpu and accel.records_cuda_graphs(mode, opts):
                why_not = accel.cuda_graphs_thread_problem()
                if why_not:
                    raise ModelSettingError(f"{key}: {mode!r} records CUDA graphs, but {why_not}")
        if self.compile_mode != "none":
            pipe.unet = accel.compile_module(pipe.unet, self.compile_mode, options, fullgraph=True, dynamic=False)
            applied.append(f"compile {self.compile_mode}")
        if self.compile_vae_mode != "none":
            if context.max_decode_chunk_size > 16:
                log.warning("compile_vae with max_decode_chunk_size %d: the first request at each size decodes a "
                            "chunk of every length up to it (%d frames) to build the graphs; set "
                            "max_decode_chunk_size to the chunk lengths this model should serve (e.g. 8)",
                            context.max_decode_chunk_size,
                            context.max_decode_chunk_size * (context.max_decode_chunk_size + 1) // 2)
            self.decoder = accel.CompiledDecoder(pipe.vae, self.compile_vae_mode, context.max_decode_chunk_size,
                                                 vae_options)
            applied.append(f"compile_vae {self.compile_vae_mode}" + (f" {vae_options}" if vae_options else ""))
        if options:
            applied.append(f"compile_options {options}")
        # last, so that a failed initialize holds no process-wide preference; before any compile (warm-up)
        self.attention = p.get("attention_backend", "auto")
        in_force = accel.prefer_sdpa_backend(self.attention)
        if in_force != "auto":
            applied.append(f"attention_backend {in_force} (process-wide)")
        self.cudnn_benchmark = _bool("cudnn_benchmark", p.get("cudnn_benchmark", "false"))
        if self.cudnn_benchmark:
            accel.use_cudnn_benchmark()
            applied.append("cudnn_benchmark (process-wide)")
        log.info("svd instance %s/%s#%d on %s (%s) loaded in %.2fs%s", context.model_name, context.model_version,
                 context.instance_index, self.device, str(self.dtype).removeprefix("torch."), time.perf_counter() - t0,
                 f"; {', '.join(applied)}" if applied else "")

    # -- preprocessing (engine threads, CPU only) ---------------------------------------------------

    def prepare(self, params: ResolvedParams, image: Image.Image) -> Prepared:
        """The pipeline's CPU preprocessing, the same operations in the same order, off the instance.

        CLIP input: diffusers' `_encode_image` up to the feature extractor (antialiased resize to
        224x224, CLIP normalisation). VAE input: `video_processor.preprocess` to width x height. Both
        stay on the CPU, as in the pipeline, until `execute` moves them to the device. Above
        EXACT_CLIP_RESIZE_MAX_COST the resize is `preprocess.clip_resize` (same values up to float32
        rounding, without blurring every pixel); below, diffusers' own code, for bit-identical frames.
        """
        processor = self.video_processor
        # CPU instances only (see _default_threads): a GPU instance's thread runs no parallel CPU ops to slow,
        # and there the preprocessing of a large image is faster on all cores
        if (self.device.type == "cpu" and threading.get_ident() != self.thread
                and not getattr(_single_threaded, "set", False)):
            torch.set_num_threads(1)  # initialize has read the process default already
            _single_threaded.set = True
        with torch.inference_mode():
            if preprocess.blur_cost(image.height, image.width) <= EXACT_CLIP_RESIZE_MAX_COST:
                pixels = processor.numpy_to_pt(processor.pil_to_numpy(image))
                pixels = _resize_with_antialiasing(pixels * 2.0 - 1.0, (224, 224))
            else:  # the same resize where it is sampled: ~25x faster for a 36 MP photo (preprocess.py)
                pixels = preprocess.clip_resize(np.asarray(image))
            pixels = (pixels + 1.0) / 2.0
            clip = self.feature_extractor(images=pixels, do_normalize=True, do_center_crop=False, do_resize=False,
                                          do_rescale=False, return_tensors="pt").pixel_values
            vae = processor.preprocess(image, height=params.height, width=params.width)
        return Prepared(clip, vae)

    # -- one batch -------------------------------------------------------------------------------

    def execute(self, requests: list[BackendRequest]) -> None:
        self._run([dataclasses.replace(r, sender=_Replay(r.sender)) for r in requests])

    def _run(self, requests: list[BackendRequest]) -> None:
        try:
            with torch.inference_mode():
                self._execute(requests)
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Out of memory. Handled here, past the except clause: while it runs, the exception's traceback
        # keeps the failed frames and their tensors alive. Now they are gone; hand their cached blocks
        # back to the device so what runs next starts clean. A batch may fit where its requests together
        # did not: run the unfinished ones alone (their senders drop what was already streamed), and
        # fail only a request that does not fit by itself.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        pending = [r for r in requests if not (r.sender.done or r.sender.is_cancelled())]
        if len(requests) > 1 and pending:
            self.batches_split += 1
            log.warning("out of device memory in a batch of %d; running its %d unfinished requests one by one",
                        len(requests), len(pending))
            for r in pending:
                self._run([r])
            return
        log.warning("out of device memory for request %s", ", ".join(r.request_id for r in pending))
        for r in pending:
            r.sender.error(OutOfMemory("out of device memory for this request; try fewer frames, a smaller "
                                       "size or a smaller decode_chunk_size"))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _execute(self, requests: list[BackendRequest]) -> None:
        pipe, dev = self.pipe, self.device
        p0 = requests[0].params
        height, width, num_frames, steps = p0.height, p0.width, p0.num_frames, p0.num_inference_steps
        do_cfg = p0.guided  # equal across a batch (part of batch_key)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. Conditioning, request by request (the pipeline's order of random draws per generator).
        #    A request whose conditioning fails is failed alone; the rest of the batch goes on.
        t0 = time.perf_counter()
        embeds, image_latents, time_ids, guidance, generators, ok = [], [], [], [], [], []
        enc_dtype = next(pipe.image_encoder.parameters()).dtype
        if self.offload:
            self.offload.use("image_encoder")
        for r in requests:
            p = r.params
            if r.sender.is_cancelled():  # cancelled after the batch was formed: no work for it
                continue
            try:
                prepared = r.prepared if r.prepared is not None else self.prepare(p, r.image)
                gen = torch.Generator(device="cpu").manual_seed(p.seed)
                emb = pipe.image_encoder(prepared.clip.to(device=dev, dtype=enc_dtype)).image_embeds.unsqueeze(1)
                image = prepared.vae.to(dev)
                noise = randn_tensor(image.shape, generator=gen, device=dev, dtype=image.dtype)
                image = image + p.noise_aug_strength * noise
                lat = self._encode_vae(image).to(emb.dtype)
            except Exception as exc:
                if is_out_of_memory(exc) or self.device_lost(exc):
                    raise  # the batch's affair (re-run alone), or the instance's (the device is gone)
                log.error("conditioning of request %s failed", r.request_id, exc_info=True)
                r.sender.error(exc)
                continue
            embeds.append(emb)
            image_latents.append(lat.unsqueeze(1).repeat(1, num_frames, 1, 1, 1))
            time_ids.append(pipe._get_add_time_ids(p.fps - 1, p.motion_bucket_id, p.noise_aug_strength,
                                                   emb.dtype, 1, 1, False))
            guidance.append(torch.linspace(p.min_guidance_scale, p.max_guidance_scale, num_frames, dtype=torch.float32))
            generators.append(gen)
            ok.append(r)
        if not ok:
            return
        requests = ok
        self._sync()
        encode_s = time.perf_counter() - t0
        for r in requests:
            r.sender.send(PhaseTiming("image_encode", encode_s / len(requests)))

        # 2. Denoising, the whole batch at once.
        t0 = time.perf_counter()
        if self.offload:
            self.offload.use("unet")
        scheduler = _scheduler(self.scheduler_config, steps, dev)
        timesteps = scheduler.timesteps
        emb = torch.cat(embeds)
        img_lat = torch.cat(image_latents)
        ids = torch.cat(time_ids).to(dev)
        shape = (1, num_frames, pipe.unet.config.in_channels // 2,
                 height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = torch.cat([randn_tensor(shape, generator=g, device=dev, dtype=emb.dtype) for g in generators])
        latents = latents * scheduler.init_noise_sigma
        gscale = torch.stack(guidance).to(dev, latents.dtype)[:, :, None, None, None]
        live = list(range(len(requests)))  # batch rows still wanted
        self._fallback_phases = set()
        t_step = time.perf_counter()
        progress = _RunAhead(len(timesteps), functools.partial(_cuda_mark, dev) if on_gpu else None)
        if self.fp8_uncalibrated:
            self._calibrate_fp8(latents, emb, img_lat, ids, gscale, do_cfg, requests[0].request_id)
            t_step = time.perf_counter()  # the first step's time is the step's
        for i, t in enumerate(timesteps):
            latents = self._denoise_step(self._unet, scheduler, t, latents, emb, img_lat, ids, gscale, do_cfg)
            # (on a GPU, step K-1 is not reported yet when the fault at step K is raised: run-ahead)
            if self.fault and self.fault[1] == i + 1 and any(requests[r].params.seed == self.fault[2] for r in live):
                if self.fault[0] == "hang":  # a call that never returns: no event, no step, for good
                    threading.Event().wait()
                elif self.fault[0] == "lost":  # what torch raises for an illegal address, an ECC error, ...
                    raise _InjectedDeviceLoss(f"CUDA error: injected device loss at step {i + 1}")
                else:
                    raise (torch.OutOfMemoryError if self.fault[0] == "oom" else RuntimeError)(
                        f"injected {self.fault[0]} at step {i + 1}")
            for step in progress.launched(i):  # the steps the device has finished by now
                now = time.perf_counter()
                for row in live:
                    requests[row].sender.send(StepDone(step + 1, len(timesteps), now - t_step))
                t_step = now
            keep = [k for k, row in enumerate(live) if not requests[row].sender.is_cancelled()]
            if len(keep) < len(live):  # drop cancelled requests from the batch between steps
                if not keep:
                    return
                idx = torch.tensor(keep, device=latents.device)
                latents, emb, img_lat, ids, gscale = (x.index_select(0, idx.to(x.device))
                                                      for x in (latents, emb, img_lat, ids, gscale))
                live = [live[k] for k in keep]
        denoise_s = time.perf_counter() - t0
        for row in live:
            requests[row].sender.send(PhaseTiming("denoise", denoise_s))

        # 3. VAE decode, request by request, chunk by chunk; each chunk goes out as soon as it is ready.
        latents = 1 / pipe.vae.config.scaling_factor * latents  # the pipeline's exact arithmetic
        if self.offload:  # the UNet's memory goes to the decode (as diffusers' offload does)
            self.offload.release()
            torch.cuda.empty_cache()
        decoder = None
        size = tuple(latents.shape[-2:])
        if self.decoder is not None and self._compiled("VAE decode", size, self.decoder.sizes):
            try:
                self.decoder.warm(latents[0])  # builds this size's graphs the first time (warm-up requests)
                decoder = self.decoder
            except accel.RECOMPILE_LIMIT_HIT:
                self._limit_hit("VAE decode", size)
        for k, row in enumerate(live):
            r = requests[row]
            chunk = r.params.decode_chunk_size
            video = latents[k]  # [F, C, h, w]
            t_req = time.perf_counter()
            for c, start in enumerate(range(0, num_frames, chunk)):
                if r.sender.is_cancelled():
                    break
                t_chunk = time.perf_counter()
                part = video[start:start + chunk]
                frames = None
                if decoder is not None:
                    try:
                        frames = decoder(part).float()
                    except accel.RECOMPILE_LIMIT_HIT:  # a guard that failed at a warmed size
                        self._limit_hit("VAE decode", size)
                        decoder = None
                if frames is None:
                    frames = pipe.vae.decode(part, num_frames=part.shape[0]).sample.float()
                frames = _to_uint8(frames, pipe.video_processor.config.do_normalize)
                r.sender.send(FramesDecoded(c, start, frames, decode_s=time.perf_counter() - t_chunk))
            else:
                r.sender.send(PhaseTiming("decode", time.perf_counter() - t_req))
                peak = torch.cuda.max_memory_allocated(self.device) if on_gpu else _process_rss()
                r.sender.send(Finished(peak_memory_bytes=int(peak), batch_size=len(requests)))

    @staticmethod
    def _denoise_step(unet, scheduler, t, latents, emb, img_lat, ids, gscale, do_cfg: bool) -> torch.Tensor:
        """One denoising step of a batch (the pipeline's arithmetic); returns the next latents."""
        if do_cfg:
            model_in = torch.cat([latents] * 2)
            cond_emb = torch.cat([torch.zeros_like(emb), emb])
            cond_lat = torch.cat([torch.zeros_like(img_lat), img_lat])
            cond_ids = torch.cat([ids, ids])
        else:
            model_in, cond_emb, cond_lat, cond_ids = latents, emb, img_lat, ids
        model_in = scheduler.scale_model_input(model_in, t)
        model_in = torch.cat([model_in, cond_lat], dim=2)
        noise_pred = unet(model_in, t, encoder_hidden_states=cond_emb, added_time_ids=cond_ids, return_dict=False)[0]
        if do_cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + gscale * (cond - uncond)
        return scheduler.step(noise_pred, t, latents).prev_sample

    def _calibrate_fp8(self, latents, emb, img_lat, ids, gscale, do_cfg: bool, request_id: str) -> None:
        """`fp8: static`: each FP8 layer's activation scale from FP8_CALIBRATION_STEPS eager denoising steps
        of this batch's own inputs, before anything is compiled (the warm-up's first batch). The batch then
        runs as it would have: the calibration works on a copy of its latents."""
        unet = getattr(self.pipe.unet, "_orig_mod", self.pipe.unet)  # eager: its bookkeeping is not compiled
        scheduler = _scheduler(self.scheduler_config, FP8_CALIBRATION_STEPS, latents.device)
        x = latents.clone()  # scaled by init_noise_sigma, the largest sigma: the same for any step count
        t0 = time.perf_counter()
        with accel.fp8_calibration(unet) as layers:
            for t in scheduler.timesteps:
                x = self._denoise_step(unet, scheduler, t, x, emb, img_lat, ids, gscale, do_cfg)
        if self.offload:  # the host copy is the master: the next request's UNet comes from it
            self.offload.write_back("unet", [b for m in layers for b in (m.input_scale, m.input_amax)])
        self.fp8_uncalibrated = False
        done = [m for m in layers if m.calibrated]
        amax = [m.input_amax.item() for m in done]
        log.info("svd instance %s: fp8 static scales of %d layers calibrated on %d steps of request %s in %.2fs "
                 "(largest input magnitude per layer %.3g..%.3g)%s", self.instance_name, len(done),
                 FP8_CALIBRATION_STEPS, request_id, time.perf_counter() - t0, min(amax, default=0),
                 max(amax, default=0), f"; {len(layers) - len(done)} layers the model does not call stay dynamic"
                 if len(done) < len(layers) else "")

    def _unet(self, model_in: torch.Tensor, *args, **kwargs):
        """The UNet's forward, compiled where _compiled says so, else eager (torch.compile's module wraps
        the one it compiles)."""
        unet, shape = self.pipe.unet, tuple(model_in.shape)
        if self.compile_mode == "none":
            return unet(model_in, *args, **kwargs)
        if self._compiled("denoising", shape, self.unet_shapes):
            try:
                out = unet(model_in, *args, **kwargs)
                self.unet_shapes.add(shape)
                return out
            except accel.RECOMPILE_LIMIT_HIT:  # raised before the graph runs: nothing to undo
                self._limit_hit("denoising", shape)
        return unet._orig_mod(model_in, *args, **kwargs)

    def _compiled(self, phase: str, shape: tuple[int, ...], warmed: set) -> bool:
        """Whether a compiled phase runs compiled at this shape: always while warming up (the warm-up is
        what compiles) and under `unwarmed_shapes: compile`; once serving, only at shapes the warm-up
        compiled, so that no request stalls its instance for a compile. Never at a shape Dynamo
        refused for its recompile limit. Else the phase runs eager: see _fell_back."""
        if (phase, shape) not in self._over_limit and (shape in warmed or self.graphs_after_warmup is None
                                                       or self.unwarmed_shapes == "compile"):
            return True
        self._fell_back(phase, shape, "the warm-up did not compile it (add a model_warmup request of that size, "
                        "frame count, batch size and guidance)")
        return False

    def _limit_hit(self, phase: str, shape: tuple[int, ...]) -> None:
        """Dynamo refused a new graph of this code object (its recompile limit counts every shape of
        every instance in the process); the phase runs eager at this shape from now on."""
        self._over_limit.add((phase, shape))
        self._fell_back(phase, shape, f"torch.compile's recompile limit is reached "
                        f"({accel.recompile_limit()} graphs of the same code in this process)", logging.ERROR)

    def _fell_back(self, phase: str, shape: tuple[int, ...], why: str, level: int = logging.WARNING) -> None:
        """Counted once per phase and batch (videogen_eager_fallbacks_total), logged once per shape (up
        to FALLBACK_LOG_LIMIT shapes: requests choose them)."""
        if phase not in self._fallback_phases:
            self._fallback_phases.add(phase)
            self.eager_fallbacks += 1
        if (phase, shape) in self._fallbacks_logged or len(self._fallbacks_logged) > FALLBACK_LOG_LIMIT:
            return
        self._fallbacks_logged.add((phase, shape))
        more = "; further shapes are not logged" if len(self._fallbacks_logged) > FALLBACK_LOG_LIMIT else ""
        log.log(level, "%s at shape %s runs uncompiled: %s%s", phase, shape, why, more)

    def _encode_vae(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if self.vae_upcast:
            moments = self.vae_quant_conv32(self.vae_encoder32(image.to(torch.float32)))
            return DiagonalGaussianDistribution(moments).mode()
        return vae.encode(image.to(vae.dtype)).latent_dist.mode()

    def finalize(self) -> None:
        if getattr(self, "attention", None):
            accel.release_sdpa_backend(self.attention)
        if getattr(self, "cudnn_benchmark", False):
            accel.release_cudnn_benchmark()
            self.cudnn_benchmark = False
        # every attribute may be missing: finalize also runs after an initialize that failed part way (a
        # missing attribute here buried the load's own error under an AttributeError)
        if getattr(self, "offload", None):
            self.offload.release()
        # the float32 VAE encoder copy of float16 instances too (~140 MB on SVD-XT)
        for name in ("pipe", "decoder", "offload", "vae_encoder32", "vae_quant_conv32"):
            self.__dict__.pop(name, None)
        device = getattr(self, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    def device_lost(self, exc: BaseException) -> bool:
        """Asks the device: an error that leaves a CUDA context unusable (an illegal address, an ECC error,
        a lost GPU) is sticky, so a synchronise and a one-element kernel fail after it too; a request's own
        launch error (a grid too large for its size, an argument cuBLAS does not support) is not, whatever
        its text says. Without a GPU (and for the injected fault) the text decides."""
        if is_out_of_memory(exc):
            return False
        if isinstance(exc, _InjectedDeviceLoss) or self.device.type != "cuda":
            return is_fatal_device_error(exc)
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
        except Exception as probe:  # noqa: BLE001 - any failure of the device itself
            log.error("instance %s: the device fails after %s: %s", self.instance_name, type(exc).__name__, probe)
            return True
        return False

    def memory_stats(self) -> Mapping[str, int]:
        if self.device.type == "cuda":
            return {"allocated": torch.cuda.memory_allocated(self.device),
                    "reserved": torch.cuda.memory_reserved(self.device),
                    "peak": torch.cuda.max_memory_allocated(self.device)}
        rss = _process_rss()
        return {"allocated": rss, "reserved": rss}

    def warmed_up(self) -> None:
        self.graphs_after_warmup = accel.GraphCounter.count(self.thread)
        if self.compile_mode != "none" or self.compile_vae_mode != "none":
            self._report_compile_cache()
        if self.unwarmed_shapes == "eager":
            missing = [phase for phase, mode, warmed in
                       (("compile", self.compile_mode, self.unet_shapes),
                        ("compile_vae", self.compile_vae_mode, self.decoder.sizes if self.decoder else ()))
                       if mode != "none" and not warmed]
            if missing:
                log.warning("%s set but no model_warmup request compiled it: with unwarmed_shapes eager, every "
                            "request runs it uncompiled; add model_warmup requests of the served shapes",
                            " and ".join(missing))

    def _report_compile_cache(self) -> None:
        """After the warm-up: how much of it compiled from scratch; the artifacts written if asked to."""
        hits, misses, bypassed = (now - before for now, before in
                                  zip(accel.GraphCounter.lookups(self.thread), self.lookups_before))
        graphs = self.graphs_after_warmup - self.graphs_before
        log.info("svd instance %s warm-up built %d graphs: Inductor found %d in its cache and compiled %d from "
                 "scratch%s", self.instance_name, graphs, hits, misses,
                 f" ({bypassed} not cacheable: compiled at every start)" if bypassed else "")
        if self.artifacts_out is not None:
            if not graphs:  # what torch recorded would be other models' (artifacts are process-wide)
                raise RuntimeError("compile artifacts: this model's warm-up compiled nothing, so there is nothing to "
                                   "write; add model_warmup requests of the shapes it serves")
            if not hits + misses:
                raise RuntimeError("compile artifacts: Inductor's graph cache was not used (disabled, e.g. "
                                   "TORCHINDUCTOR_FX_GRAPH_CACHE=0, or every graph bypassed it): nothing to write")
            path, size = accel.save_compile_artifacts(self.artifacts_out, self.device)
            log.info("wrote compile artifacts %s (%.1f MiB)", path, size / 2**20)
        elif misses and self.artifacts_loaded:
            log.warning("%s did not cover this warm-up (%d graphs compiled from scratch: the model's compile "
                        "parameters, warm-up shapes or versions changed since they were written?); rerun "
                        "`videogen-server compile-artifacts` for this model", self.artifacts_folder, misses)

    def run_stats(self) -> Mapping[str, int]:
        return {"batches_split": self.batches_split}

    def compile_stats(self) -> Mapping[str, int]:
        if self.compile_mode == "none" and self.compile_vae_mode == "none":
            return {}
        graphs = accel.GraphCounter.count(self.thread)
        base = graphs if self.graphs_after_warmup is None else self.graphs_after_warmup
        hits, misses, bypasses = (now - before for now, before in
                                  zip(accel.GraphCounter.lookups(self.thread), self.lookups_before))
        return {"compiles": graphs - self.graphs_before, "recompiles": graphs - base,
                "eager_fallbacks": self.eager_fallbacks,
                "cache_hits": hits, "cache_misses": misses, "cache_bypasses": bypasses}


class _Replay:
    """A request's sender for one execute: remembers what went out, so a re-run (a batch split after
    running out of memory) streams each step and decode chunk once, and knows who finished."""

    def __init__(self, sender) -> None:
        self._sender = sender
        self._step = 0
        self._chunk = -1
        self._phases: set[str] = set()
        self.done = False  # finished, or failed: nothing to re-run

    def send(self, event) -> None:
        if isinstance(event, StepDone):
            if event.step <= self._step:
                return self._sender.progressed()  # (the re-run goes on: not a stall)
            self._step = event.step
        elif isinstance(event, FramesDecoded):
            if event.chunk_index <= self._chunk:
                return self._sender.progressed()
            self._chunk = event.chunk_index
        elif isinstance(event, PhaseTiming):
            if event.phase in self._phases:
                return self._sender.progressed()
            self._phases.add(event.phase)
        elif isinstance(event, Finished):
            self.done = True
        self._sender.send(event)

    def error(self, exc: BaseException) -> None:
        self.done = True
        self._sender.error(exc)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()

    def progressed(self) -> None:
        self._sender.progressed()


class _RunAhead:
    """Which denoising steps are finished, for progress reports, with the host one step ahead on a GPU.

    After a full synchronise per step the device idles while the host reports, checks cancellations
    and launches the next step (~8 ms a step, H200 run 4). Here each launched step records an event,
    and `launched(i)` waits only for the steps before i: step i is queued behind step i-1 while the host
    waits, so the device goes from one to the next without a gap. Progress still reports finished
    work; a row cancelled meanwhile costs the one step already queued. Without events (a CPU: work is
    done when the call returns) every step is finished as soon as it is launched.
    """

    def __init__(self, total: int, mark=None) -> None:
        self.total, self._mark = total, mark  # mark(): an event recorded after the work launched so far
        self._queued: list[tuple[int, Any]] = []

    def launched(self, step: int):
        """Yields, in order, each step finished now that `step` is launched (waiting for its event)."""
        self._queued.append((step, self._mark() if self._mark is not None else None))
        ahead = 1 if self._mark is not None and step + 1 < self.total else 0  # the last step is waited for
        while len(self._queued) > ahead:
            done, event = self._queued.pop(0)
            if event is not None:
                event.synchronize()
            yield done


def _to_uint8(frames: torch.Tensor, denormalize: bool) -> np.ndarray:
    """Decoded float32 frames [F, 3, H, W] -> uint8 [F, H, W, 3], on the frames' device.

    The arithmetic of diffusers' `postprocess(output_type="np")` and `numpy_to_pil` (x * 0.5 + 0.5,
    clamp to [0, 1], * 255, round half to even), op for op in float32, so the bytes are the same; but
    on the device, in place, and only uint8 crosses to the host: the host's numpy version of it took
    ~90 ms per 8 frames at 1024x576 (here, one core) while the GPU waited for the next chunk's launch.
    """
    x = (frames * 0.5).add_(0.5).clamp_(0, 1) if denormalize else frames.clone()
    x.mul_(255).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _cuda_mark(device: torch.device):
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _block_rows(value: str) -> int:
    """forward_chunking: true | false | tokens per block (>= MIN_BLOCK_ROWS) -> tokens per block (0: off)."""
    word = value.strip().lower()
    if word in ("true", "yes", "false", "no", "0"):
        return accel.FF_BLOCK_ROWS if word in ("true", "yes") else 0
    rows = int(word) if word.isascii() and word.isdigit() else 0
    if rows < MIN_BLOCK_ROWS:
        raise ValueError(f"forward_chunking: expected true, false or a number of tokens per block of at least "
                         f"{MIN_BLOCK_ROWS}, got {value!r}")
    return rows


class _InjectedDeviceLoss(RuntimeError):
    """fault_injection's `lost@K`: what torch raises for a lost device, on a device that is fine."""


def _parse_fault(text: str):
    """`oom@K:seed=N` / `error@K:seed=N` / `lost@K:seed=N` / `hang@K:seed=N` -> (kind, step, seed); "" -> None."""
    if not text:
        return None
    try:
        head, _, seed = text.partition(":seed=")
        kind, _, step = head.partition("@")
        if kind not in ("oom", "error", "lost", "hang"):
            raise ValueError
        return kind, int(step), int(seed)
    except ValueError:
        raise ValueError(f"fault_injection: {text!r} is not oom@STEP:seed=N, error@STEP:seed=N, "
                         f"lost@STEP:seed=N or hang@STEP:seed=N") from None


def _process_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
