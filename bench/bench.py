"""Benchmark: the plain diffusers pipeline vs. the videogen server, same weights, same workload, one run.

Usage:
    OMP_NUM_THREADS=1 python bench/bench.py --tiny --out /tmp/benchout   # CPU, tiny random SVD (64x48, 8 frames, 6 steps)
    python bench/bench.py                                # GPU, full-size SVD-XT, random fp16 weights
    python bench/bench.py --variants plain,server --steps 10 --time-budget 400

Full size builds the SVD-XT architecture with random weights exactly as the team's reference baseline
(svd_baseline.py, kept with its H200 figures outside this repository) does (no download), casts it to fp16 and saves it once into <workdir>/repo/svd-xt/1/ with a config.pbtxt;
the plain pipeline (StableVideoDiffusionPipeline.from_pretrained) and every server variant load those files.
Workload: 1024x576, 25 frames, 25 steps, decode_chunk_size 8, seed 42.

Variants (--variants, comma list):
  plain           the diffusers pipeline in-process: warm-up call (2 steps), then timed call(s)
  plain_compile   the same with torch.compile(unet, mode=--compile-mode, fullgraph=True)
  plain_lowmem    the pipeline with model CPU offload (GPU), forward chunking and decode_chunk_size 2
  server          VideoGenServer in-process (own event-loop thread), called through the gRPC client SDK
                  over loopback with frame_encoding "png" and stream_video on: one warm-up request (2 steps),
                  then timed requests, medians reported
  server_lowmem   server with cpu_offload (GPU only), forward_chunking and decode_chunk_size 2
  server_offload  server with cpu_offload and decode_chunk_size 2, no forward chunking (isolates chunking's cost)
  server_compile  server with compile=--compile-mode for the UNet, compile_vae=default for the VAE decoder
                  (ready_s includes compilation) and a persistent compile cache under <workdir>/compile-cache
  server_compile_warm  the same again: a restart that finds its kernels in the cache (run it in a second
                  process, as a restarted server would be: in one process torch's in-memory caches are warm too)
  server_compile_artifacts  `videogen-server compile-artifacts` on server_compile's configuration, in its own
                  process with the configuration's compile cache (warm if an earlier run filled it), then the
                  server with an empty compile cache of its own, as on a new machine: ready_s is the start from
                  the artifacts (run it alone in its process, as server_compile_warm)
  server_compile_fp8   server_compile with fp8=true; PSNR of its frames against the plain pipeline's
  server_compile_fp8_static  server_compile with fp8=static (activation scales calibrated on the warm-up)
  unet_tricks     one UNet forward (guidance batch, eager) per option, each on its own: float16, bfloat16,
                  channels_last, fuse_qkv, fp8, fold_cross_attention, temporal_convs_2d (alone and with
                  channels_last), each SDPA backend, cudnn_benchmark; seconds and error against float16
--server-params k=v,k=v adds backend parameters to every server variant (e.g. attention_backend=cudnn).
--profile (GPU) adds each server variant's device time per denoising step by kernel kind (conv, attention,
gemm, gemm_fp8, triton = Inductor's fused kernels, memcpy, ...) and its top kernels.
With --tiny the server variant also measures the overhead ratio (server e2e / plain total, medians of 5) and
the busy fraction of a 1-instance server under --load concurrent requests.

Results go to <out>/bench_results.json (rewritten after every variant); a table is printed at the end. Exit
status 1 when a variant failed (or the load test's requests did), else 0.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

ALL_VARIANTS = ("plain", "server", "server_lowmem", "server_offload", "server_compile", "server_compile_warm",
                "server_compile_artifacts", "server_compile_fp8", "server_compile_fp8_static",
                "plain_compile", "plain_lowmem", "unet_tricks")
T0 = time.perf_counter()
GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


# -- the model -------------------------------------------------------------------------------------

def build_full_pipeline(device: str):
    """Full-size SVD-XT with random weights, as the reference script builds it."""
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel()  # class defaults == SVD / SVD-XT unet config
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4,
                                           layers_per_block=2)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14,
            image_size=224, projection_dim=1024, hidden_act="gelu"))
    fe = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=sched, feature_extractor=fe)


def prepare_weights(workdir: Path, name: str, tiny: bool, device: str, dtype: torch.dtype) -> dict:
    """Build and save the model once into <workdir>/repo/<name>/1/; reused when the marker matches."""
    version_dir = workdir / "repo" / name / "1"
    marker = workdir / "bench_model.json"
    want = {"arch": "tiny" if tiny else "svd-xt", "dtype": str(dtype), "seed": 0}
    if marker.exists() and (version_dir / "model_index.json").exists():
        info = json.loads(marker.read_text())
        if info.get("key") == want:
            log(f"reusing weights in {version_dir}")
            return {**info, "build_s": 0.0, "reused": True}
    t0 = time.perf_counter()
    if tiny:
        from videogen_server.backends.svd.tiny import build_tiny_pipeline
        pipe = build_tiny_pipeline(0)
    else:
        pipe = build_full_pipeline(device)
    pipe.to(dtype=dtype)
    params_m = {k: round(sum(p.numel() for p in getattr(pipe, k).parameters()) / 1e6, 1)
                for k in ("unet", "vae", "image_encoder")}
    version_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(version_dir), safe_serialization=True)
    del pipe
    free_memory()
    info = {"key": want, "path": str(version_dir), "params_M": params_m}
    marker.write_text(json.dumps(info))
    log(f"built and saved {want['arch']} weights ({params_m} M params) in {time.perf_counter() - t0:.1f}s")
    return {**info, "build_s": round(time.perf_counter() - t0, 1), "reused": False}


def write_config(model_dir: Path, a, kind: str, dtype: str, decode_chunk: int, extra: dict) -> dict:
    """config.pbtxt for one variant; its warm-up request has the benchmark's shape (2 steps)."""
    params = {"dtype": dtype, "default_width": a.width, "default_height": a.height, "default_num_frames": a.frames,
              "default_num_inference_steps": a.steps, "default_decode_chunk_size": decode_chunk,
              "max_num_frames": max(25, a.frames), "min_width": 16, "min_height": 16,
              "max_width": max(1024, a.width), "max_height": max(1024, a.height), **extra}
    warm = {"width": a.width, "height": a.height, "num_frames": a.frames, "num_inference_steps": 2,
            "decode_chunk_size": decode_chunk}
    lines = [f'name: "{model_dir.name}"', 'backend: "svd"', "max_batch_size: 1",
             f"instance_group [ {{ count: 1, kind: {kind} }} ]",
             "dynamic_batching { max_queue_delay_microseconds: 0 default_queue_policy { max_queue_size: 32 } }"]
    lines += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]
    inputs = " ".join(f'inputs {{ key: "{k}" value: "{v}" }}' for k, v in warm.items())
    lines.append(f'model_warmup [ {{ name: "bench" {inputs} }} ]')
    (model_dir / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return {k: str(v) for k, v in params.items()}


def test_image(width: int, height: int) -> bytes:
    """The reference's synthetic gradient image, as PNG bytes."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 7) % 256, (y * 5) % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- helpers ---------------------------------------------------------------------------------------

class Ctx:
    """What every variant needs."""

    def __init__(self, a, device: str, dtype: torch.dtype, version_dir: Path, png: bytes, cpu_threads):
        self.a, self.device, self.dtype, self.version_dir, self.png = a, device, dtype, version_dir, png
        self.cuda = device == "cuda"
        self.cpu_threads = cpu_threads
        self.reference_frames = None  # uint8 frames of the plain run (this process's or a saved one's)
        self.reference_path = version_dir.parent.parent.parent / (
            f"reference-{a.width}x{a.height}-{a.frames}f-{a.steps}s-c{a.decode_chunk}-seed{a.seed}.npy")
        if self.reference_path.exists():
            self.reference_frames = list(np.load(self.reference_path))

    def set_reference(self, frames) -> None:
        """The plain pipeline's frames, kept for the variants after it and saved for later processes."""
        self.reference_frames = frames
        np.save(self.reference_path, np.stack(frames))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_gib(self):
        if self.cuda:
            return round(torch.cuda.max_memory_allocated() / GIB, 2)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)  # process RSS peak

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def quiet_libraries() -> None:
    """No loading progress bars or deprecation chatter from diffusers / transformers."""
    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def tune_malloc() -> bool:
    """CPU runs: stop glibc from trimming the heap and mmapping big buffers afresh on every call; the page
    faults that follow cost up to ~25 % of a tiny run, unevenly between threads, and blur plain vs. server."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 32 << 20))  # M_TRIM_/M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def free_memory(reset_dynamo: bool = False) -> None:
    if reset_dynamo:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocated_gib():
    return round(torch.cuda.memory_allocated() / GIB, 2) if torch.cuda.is_available() else None


def max_diff(ref, frames) -> int | None:
    """Largest per-pixel difference between two lists of uint8 frames (None if either is missing)."""
    if ref is None or frames is None or len(ref) != len(frames) or any(f is None for f in frames):
        return None
    return int(max(np.abs(r.astype(np.int16) - f.astype(np.int16)).max() for r, f in zip(ref, frames)))


def psnr(ref, frames) -> float | None:
    """PSNR in dB of every frame against the reference's (None if either is missing; 999 if identical)."""
    if ref is None or frames is None or len(ref) != len(frames) or any(f is None for f in frames):
        return None
    mse = float(np.mean([np.mean((r.astype(np.float64) - f) ** 2) for r, f in zip(ref, frames)]))
    return 999.0 if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


# -- plain diffusers -------------------------------------------------------------------------------

def run_plain(ctx: Ctx, compiled: bool, lowmem: bool = False) -> dict:
    """On a worker thread of its own, as the server's instance runs (same allocator arena behaviour)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="plain") as pool:
        return pool.submit(_run_plain, ctx, compiled, lowmem).result()


def _run_plain(ctx: Ctx, compiled: bool, lowmem: bool) -> dict:
    from diffusers import StableVideoDiffusionPipeline

    a = ctx.a
    if ctx.cpu_threads:
        torch.set_num_threads(ctx.cpu_threads)
    alloc_before = allocated_gib()
    t0 = time.perf_counter()
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ctx.version_dir), torch_dtype=ctx.dtype,
                                                        use_safetensors=True)
    decode_chunk = a.decode_chunk
    if lowmem:  # the reference's low-memory recipe, to compare with server_lowmem in the same run
        if ctx.cuda:
            pipe.enable_model_cpu_offload()
        pipe.unet.enable_forward_chunking()
        decode_chunk = 2
    else:
        pipe.to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    if compiled:
        pipe.unet = torch.compile(pipe.unet, mode=a.compile_mode, fullgraph=True)
    image = Image.open(io.BytesIO(ctx.png)).convert("RGB")

    def call(steps: int) -> dict:
        stamps = []

        def on_step(p, i, t, kwargs):
            ctx.sync()
            stamps.append(time.perf_counter())
            return kwargs

        ctx.reset_peak()
        ctx.sync()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        frames = pipe(image, height=a.height, width=a.width, num_frames=a.frames, num_inference_steps=steps,
                      decode_chunk_size=decode_chunk, generator=torch.Generator("cpu").manual_seed(a.seed),
                      callback_on_step_end=on_step, output_type="np").frames[0]
        ctx.sync()
        t1 = time.perf_counter()
        steps_t = [b - x for x, b in zip(stamps, stamps[1:])]
        out = {"total_s": round(t1 - t0, 3), "process_cpu_s": round(time.process_time() - cpu0, 2),
               "median_step_s": median(steps_t),
               "encode_plus_step0_s": round(stamps[0] - t0, 3), "decode_and_post_s": round(t1 - stamps[-1], 3),
               "peak_mem_gib": ctx.peak_gib()}
        out["_frames"] = [(f * 255).round().astype(np.uint8) for f in frames]
        return out

    t0 = time.perf_counter()
    with torch.inference_mode():
        call(2)  # warm-up (compiles with plain_compile)
        warmup_s = time.perf_counter() - t0
        runs = [call(a.steps) for _ in range(a.plain_repeats)]
    if not compiled and not lowmem:
        ctx.set_reference(runs[-1]["_frames"])
    max_d = max_diff(ctx.reference_frames, runs[-1]["_frames"]) if compiled else None
    for r in runs:
        del r["_frames"]
    pipe = None  # frees the pipeline as `del` would; `call` above closes over the name
    res = {"alloc_before_gib": alloc_before, "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2),
           "ready_s": round(load_s + warmup_s, 2), "runs": runs, **{k: median(r[k] for r in runs) for k in runs[0]}}
    res.update(e2e_s=res["total_s"], first_frame_s=res["total_s"], step_s=res["median_step_s"],
               decode_s=res["decode_and_post_s"], max_abs_diff_vs_plain=max_d)
    return res


# -- one UNet forward per option ----------------------------------------------------------------------

def run_unet_tricks(ctx: Ctx) -> dict:
    """Eager UNet forward with guidance (batch 2) at the workload's shape, one option at a time, through
    the backend's own helpers (videogen_server.backends.svd.accel). Eager figures: under torch.compile
    the elementwise work around each option fuses, so they bound, not predict, the compiled gain."""
    import copy

    from diffusers import UNetSpatioTemporalConditionModel
    from videogen_server.backends.svd import accel

    a, dev = ctx.a, torch.device(ctx.device)
    base = UNetSpatioTemporalConditionModel.from_pretrained(str(ctx.version_dir / "unet"), torch_dtype=ctx.dtype,
                                                            use_safetensors=True).to(dev).eval()
    g = torch.Generator("cpu").manual_seed(0)
    h, w = a.height // 8, a.width // 8
    inputs = dict(sample=torch.randn(2, a.frames, 8, h, w, generator=g),
                  timestep=torch.tensor(1.0), encoder_hidden_states=torch.randn(2, 1, 1024, generator=g),
                  added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2))
    if a.tiny:
        inputs["encoder_hidden_states"] = torch.randn(2, 1, base.config.cross_attention_dim, generator=g)
    repeats = 2 if a.tiny else 5

    def measure(unet, dtype, sdpa="auto", cudnn_benchmark=False) -> dict:
        x = {k: v.to(dev, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        accel.prefer_sdpa_backend(sdpa)  # as the server sets it (process-wide), released below
        if cudnn_benchmark:
            accel.use_cudnn_benchmark()
        try:
            with torch.inference_mode():
                out = unet(**x, return_dict=False)[0]  # warm-up (cuDNN / cuBLAS heuristics, allocator)
                times = []
                for _ in range(repeats):
                    ctx.sync()
                    t0 = time.perf_counter()
                    out = unet(**x, return_dict=False)[0]
                    ctx.sync()
                    times.append(time.perf_counter() - t0)
        finally:
            accel.release_sdpa_backend(sdpa)
            if cudnn_benchmark:
                accel.release_cudnn_benchmark()
        return {"forward_s": median(times), "out": out.float()}

    res: dict = {"shape": [2, a.frames, 8, h, w], "repeats": repeats}
    ref = measure(base, ctx.dtype)
    res["float16" if ctx.dtype == torch.float16 else "float32"] = {"forward_s": ref["forward_s"]}

    def variant(name: str, make, dtype=ctx.dtype, **kw) -> None:
        if over_budget(a):
            res[name] = {"skipped": "time budget"}
            return
        try:
            unet = make()
            r = measure(unet, dtype, **kw)
            err = (r["out"] - ref["out"]).norm() / ref["out"].norm()
            res[name] = {"forward_s": r["forward_s"], "speedup": round(ref["forward_s"] / r["forward_s"], 3),
                         "rel_l2_error_vs_base": round(float(err), 5)}
            del unet, r
        except Exception as err:  # noqa: BLE001 - an option a GPU lacks is a result too
            res[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        free_memory()
        log(f"unet_tricks {name}: {res[name]}")

    def with_(fn):
        def make():
            unet = copy.deepcopy(base)
            fn(unet)
            return unet
        return make

    if ctx.cuda:
        variant("bfloat16", lambda: copy.deepcopy(base).to(torch.bfloat16), dtype=torch.bfloat16)
    variant("channels_last", with_(accel.channels_last))
    variant("fuse_qkv", with_(accel.fuse_qkv))
    variant("fp8", with_(accel.to_fp8))
    variant("fuse_qkv+fp8", with_(lambda u: (accel.fuse_qkv(u), accel.to_fp8(u))))
    variant("fold_cross_attention", with_(accel.fold_cross_attention))
    variant("temporal_convs_2d", with_(accel.temporal_convs_2d))
    variant("temporal_convs_2d+channels_last", with_(lambda u: (accel.temporal_convs_2d(u), accel.channels_last(u))))
    for sdpa in ("flash", "cudnn", "efficient"):
        variant(f"sdpa_{sdpa}", lambda: base, sdpa=sdpa)
    variant("cudnn_benchmark", lambda: base, cudnn_benchmark=True)  # the warm-up call pays the timing
    base = None  # frees the UNet as `del` would; the variants' closures read the name
    return res


# -- the server, in-process ------------------------------------------------------------------------

class ServerThread:
    """A VideoGenServer on its own asyncio loop in a daemon thread, gRPC on 127.0.0.1:<free port>."""

    def __init__(self, repo: Path, cpu_threads) -> None:
        from videogen_server.config import ServerConfig

        self.config = ServerConfig(model_repositories=(repo,), host="127.0.0.1", port=0, metrics_port=-1,
                                   cpu_threads=cpu_threads, drain_grace_seconds=5.0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="bench-server-loop")
        self.server = None

    def run(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        from videogen_server.app import VideoGenServer

        self.thread.start()

        async def _start():
            self.server = VideoGenServer(self.config)
            await self.server.start()

        self.run(_start())

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.run(self.server.stop(5), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            if not self.thread.is_alive():
                self.loop.close()
            self.server = None


def one_request(client, ctx: Ctx, model: str, steps: int, decode_chunk: int, keep_frames: bool = False,
                **conditioning) -> dict:
    """One Generate call through the SDK; client-side timings plus the server's Summary."""
    from videogen_client.events import Frame, Progress, Summary, VideoChunk

    a = ctx.a
    progress, frames, video_bytes, first_frame, summary = [], {}, 0, None, None
    chunk_arrivals = []  # when each decode chunk's first frame arrived: the decode's pace, chunk by chunk
    cpu0 = time.process_time()  # all threads: ~wall while one thread launches kernels, far less when GPU-bound
    t0 = time.perf_counter()
    for ev in client.generate(ctx.png, model=model, width=a.width, height=a.height, num_frames=a.frames,
                              num_inference_steps=steps, decode_chunk_size=decode_chunk,
                              **{"seed": a.seed, **conditioning}, frame_encoding="png", stream_video=True,
                              timeout=3600):
        now = time.perf_counter()
        if isinstance(ev, Progress):
            progress.append((ev.elapsed_seconds, now))
        elif isinstance(ev, Frame):
            first_frame = now if first_frame is None else first_frame
            if ev.index % decode_chunk == 0:
                chunk_arrivals.append(round(now - t0, 3))
            if keep_frames:
                frames[ev.index] = ev  # decoded after the clock stops
        elif isinstance(ev, VideoChunk):
            video_bytes += len(ev.data)
        elif isinstance(ev, Summary):
            summary = ev
    t1 = time.perf_counter()
    cpu_s = time.process_time() - cpu0
    steps_t = [b[0] - x[0] for x, b in zip(progress, progress[1:])]
    s = summary
    return {"t_send": t0, "t_done": t1, "e2e_s": round(t1 - t0, 3), "process_cpu_s": round(cpu_s, 2),
            "first_frame_s": round(first_frame - t0, 3) if first_frame else None, "step_s": median(steps_t),
            "tail_s": round(t1 - progress[-1][1], 3) if progress else None, "video_bytes": video_bytes,
            "last_step_s": round(progress[-1][1] - t0, 3) if progress else None, "chunk_arrivals_s": chunk_arrivals,
            "queue_s": s.queue_seconds, "image_encode_s": s.image_encode_seconds, "denoise_s": s.denoise_seconds,
            "decode_s": s.decode_seconds, "video_encode_s": s.video_encode_seconds,
            "server_total_s": s.total_seconds, "server_first_frame_s": s.first_frame_seconds,
            "peak_mem_gib": round(s.peak_memory_bytes / GIB, 2), "batch_size": s.batch_size,
            "_frames": [np.asarray(frames[i].to_pil().convert("RGB")) if i in frames else None
                        for i in range(a.frames)] if keep_frames else None}


def saturate(client, ctx: Ctx, model: str, decode_chunk: int, n: int) -> dict:
    """n concurrent requests from threads; busy fraction = summed model time / wall time."""
    results: list = [None] * n

    def worker(i):
        try:
            results[i] = one_request(client, ctx, model, ctx.a.steps, decode_chunk)
        except Exception as err:  # noqa: BLE001 - reported below
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [repr(r) for r in results if isinstance(r, Exception)]
    ok = [r for r in results if isinstance(r, dict)]
    if not ok:
        return {"errors": errors}
    wall = max(r["t_done"] for r in ok) - min(r["t_send"] for r in ok)
    busy = sum(r["image_encode_s"] + r["denoise_s"] + r["decode_s"] for r in ok)
    return {"requests": n, "completed": len(ok), "errors": errors, "wall_s": round(wall, 3),
            "busy_fraction": round(busy / wall, 3), "videos_per_s": round(len(ok) / wall, 3),
            "median_queue_s": median(r["queue_s"] for r in ok), "median_e2e_s": median(r["e2e_s"] for r in ok)}


KERNEL_KINDS = (  # first match wins; names as CUPTI reports them on Hopper (cuDNN, cuBLAS, CUTLASS, Inductor)
    # Inductor names its kernels after the ops fused into them (a convolution's bias add, an attention
    # output's transpose), so its kernels go first, whatever ops they mention; its GEMM and convolution
    # templates (max-autotune: triton_tem_fused_mm_3, triton_tem_fused_add_convolution_4) first of all;
    # Inductor sorts the fused ops' names, so a template's own op may come anywhere in its name
    ("conv_triton", ("triton_tem_*convolution",)),
    ("attention", ("triton_tem_*attention",)),
    ("gemm_triton", ("triton_tem_",)),
    ("triton", ("triton_",)),
    ("memcpy", ("memcpy", "memset")),
    ("layout", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("conv", ("fprop", "dgrad", "conv", "implicit_convolve", "winograd")),
    ("gemm_fp8", ("e4m3", "f8f8", "fp8", "nvjet_sm90_qq")),  # cuBLAS's FP8 kernels: nvjet_sm90_qqtst_...
    ("gemm", ("gemm", "nvjet", "cutlass", "matmul", "cublas", "xmma")),
    ("norm", ("norm", "moments")),
)


def kernel_kind(name: str) -> str:
    """The kind of the first KERNEL_KINDS key found in the name; a key `a*b` needs `b` after `a`."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        for key in keys:
            head, _, tail = key.partition("*")
            at = low.find(head)
            if at >= 0 and (not tail or tail in low[at + len(head):]):
                return kind
    return "other"


def device_activity(fn) -> tuple[dict, dict]:
    """Runs fn under torch.profiler (device activity only: CUPTI sees every thread's kernels, CUDA graph
    replays included); returns seconds per kernel kind and per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    kinds, names = {}, {}
    for e in prof.events():
        if getattr(e.device_type, "name", "") != "CUDA":
            continue
        us = e.time_range.elapsed_us()
        kinds[kernel_kind(e.name)] = kinds.get(kernel_kind(e.name), 0.0) + us / 1e6
        n = names.setdefault(e.name[:120], [0, 0.0])
        n[0] += 1
        n[1] += us / 1e6
    return kinds, names


def profile_steps(client, ctx: Ctx, model: str, chunk: int, steps: int = 4) -> dict:
    """Device time of one denoising step by kernel kind: a request of `steps` steps minus one of 1 step
    (same image encode and decode), divided by steps - 1. The kernel sum beside the measured step time
    says whether the step is device-bound (sum ~ step) or waits on the host (sum << step)."""
    k1, _ = device_activity(lambda: one_request(client, ctx, model, 1, chunk))
    box = {}
    kn, names = device_activity(lambda: box.setdefault("r", one_request(client, ctx, model, steps, chunk)))
    per = {k: round((kn.get(k, 0.0) - k1.get(k, 0.0)) / (steps - 1), 4) for k in sorted(set(kn) | set(k1))}
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:15]
    return {"steps": steps, "step_s_measured": box["r"]["step_s"], "per_step_s_by_kind": per,
            "per_step_kernel_sum_s": round(sum(per.values()), 4),
            "top_kernels_whole_request": [{"name": n, "count": c, "s": round(t, 4)} for n, (c, t) in top]}


def build_artifacts(ctx: Ctx, model_dir: Path, folder: Path) -> dict:
    """`videogen-server compile-artifacts` on the model's config.pbtxt, in a process of its own as a Job runs it
    (its compile cache is the config's compile_cache_dir); the file it writes into `folder` and how long it took."""
    import shutil
    import subprocess

    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "videogen_server.cli", "compile-artifacts", "--model-repository",
           str(model_dir.parent), "--model", model_dir.name]
    if ctx.cpu_threads:
        cmd += ["--cpu-threads", str(ctx.cpu_threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(folder.glob("*.bin"))
    if proc.returncode != 0 or not files:
        raise RuntimeError(f"compile-artifacts exited {proc.returncode}: {proc.stderr[-1500:]}")
    built = {"artifacts_build_s": round(time.perf_counter() - t0, 2), "artifacts_file": files[0].name,
             "artifacts_mib": round(files[0].stat().st_size / 2**20, 1)}
    log(f"compile artifacts: {built}")
    return built


def run_server(ctx: Ctx, name: str, model_dir: Path, checkpoint: Callable[[dict], None] = lambda res: None) -> dict:
    """One server variant. `checkpoint(res)` is called with the figures so far (marked incomplete) after
    start-up and after the timed requests: on the device a call killed at its time limit, or a late
    failure, keeps what was measured."""
    from videogen_client import VideoGenClient
    from videogen_server.backends.base import COMPILE_ARTIFACTS_FOLDER

    a = ctx.a
    extra, chunk = {}, a.decode_chunk
    if name in ("server_lowmem", "server_offload"):
        extra, chunk = ({"forward_chunking": "true"} if name == "server_lowmem" else {}), 2
        if ctx.cuda:
            extra["cpu_offload"] = "true"
    elif name.startswith("server_compile"):
        # the second start (server_compile_warm) finds the first one's kernels in the cache
        # max_decode_chunk_size: the warm-up builds the VAE graphs up to this chunk length (and decodes one
        # chunk of it: a limit of 25 frames would cost ~32 GiB at 1024x576)
        extra = {"compile": a.compile_mode, "compile_vae": "default", "max_decode_chunk_size": chunk,
                 "compile_cache_dir": str(model_dir.parent.parent / "compile-cache")}
        if name == "server_compile_fp8":
            extra["fp8"] = "true"
        elif name == "server_compile_fp8_static":
            extra["fp8"] = "static"
    extra.update(a.server_params)
    kind, dtype = "KIND_GPU" if ctx.cuda else "KIND_CPU", "float16" if ctx.dtype == torch.float16 else "float32"
    built = {}
    artifacts = model_dir / ctx.version_dir.name / COMPILE_ARTIFACTS_FOLDER
    if name == "server_compile_artifacts":
        write_config(model_dir, a, kind, dtype, chunk, extra)
        built = build_artifacts(ctx, model_dir, artifacts)
        # the server: a compile cache nothing has filled, as on a machine that never compiled this model
        extra["compile_cache_dir"] = str(model_dir.parent.parent / f"compile-cache-empty-{os.getpid()}")
    params = write_config(model_dir, a, kind, dtype, chunk, extra)
    alloc_before = allocated_gib()
    srv = ServerThread(model_dir.parent, ctx.cpu_threads)
    t0 = time.perf_counter()
    res: dict = {}
    try:
        srv.start()
        ready_s = time.perf_counter() - t0
        engine = srv.server.engine
        if not engine.model_ready(model_dir.name):
            raise RuntimeError(f"model not ready: {engine.models[model_dir.name].error}")
        res = {"ready_s": round(ready_s, 2), "alloc_before_gib": alloc_before, "parameters": params,
               "decode_chunk_size": chunk, **built}
        if "compile" in extra:  # graphs Inductor found in its cache / compiled from scratch, process-wide
            from videogen_server.backends.svd import accel

            res["inductor_cache_hits"], res["inductor_cache_misses"] = accel.cache_lookups()
        try:  # load / warm-up split, from the engine's instance (internal; best effort)
            inst = next(iter(engine.models[model_dir.name].loaded.values())).instances[0]
            res.update(load_s=round(inst.load_seconds, 2), warmup_s=round(inst.warmup_seconds, 2))
        except Exception:  # noqa: BLE001
            pass
        log(f"{name}: ready in {ready_s:.1f}s on port {srv.server.port}")
        checkpoint({**res, "incomplete": "after start-up"})
        with VideoGenClient(f"127.0.0.1:{srv.server.port}") as client:
            one_request(client, ctx, model_dir.name, 2, chunk)  # client-side warm-up
            runs = []
            for i in range(a.server_repeats):
                runs.append(one_request(client, ctx, model_dir.name, a.steps, chunk, keep_frames=(i == 0)))
                log(f"{name}: request {i + 1}: " + ", ".join(f"{k} {runs[-1].get(k)}" for k in (
                    "e2e_s", "first_frame_s", "step_s", "decode_s", "peak_mem_gib") if k in runs[-1]))
            # frames match plain's only with the same decode chunking (the decoder is temporal)
            same_chunks = chunk == a.decode_chunk
            res["max_abs_diff_vs_plain"] = max_diff(ctx.reference_frames, runs[0]["_frames"]) if same_chunks else None
            res["psnr_vs_plain_db"] = psnr(ctx.reference_frames, runs[0]["_frames"]) if same_chunks else None
            for r in runs:
                for k in ("_frames", "t_send", "t_done"):
                    del r[k]
            res["runs"] = runs
            res.update({k: median(r[k] for r in runs) for k in runs[0] if not isinstance(runs[0][k], list)})
            res["chunk_arrivals_s"] = runs[0]["chunk_arrivals_s"]  # the first timed request's, as its frames
            checkpoint({**res, "incomplete": "after the timed requests"})
            if "compile" in extra:  # other seeds, conditioning and decode chunking must not recompile
                try:  # like the profile below: a failure here must not lose the timings
                    before = dict(inst.backend.compile_stats())
                    others = sorted({max(1, chunk // 2), min(3, chunk), min(5, chunk), chunk})
                    for other in others:
                        one_request(client, ctx, model_dir.name, 3, other, seed=7, fps=12, motion_bucket_id=60)
                    res["compile_stats_after_timed_runs"] = before
                    res["compile_stats_after_other_params"] = dict(inst.backend.compile_stats())
                    res["other_decode_chunk_sizes"] = others
                except Exception as err:  # noqa: BLE001
                    res["compile_stats_error"] = f"{type(err).__name__}: {err}"[:300]
                # run 6 (H200) died of a segfault after its profile: what came before it was lost
                checkpoint({**res, "incomplete": "after the recompile check"})
            if a.profile and ctx.cuda:
                try:
                    res["profile"] = profile_steps(client, ctx, model_dir.name, chunk)
                    log(f"{name}: profile {res['profile']['per_step_s_by_kind']}")
                except Exception as err:  # noqa: BLE001 - a profiler failure must not lose the timings
                    res["profile"] = {"error": f"{type(err).__name__}: {err}"[:300]}
                checkpoint({**res, "incomplete": "after the profile"})
            if name == "server" and a.load > 0 and not over_budget(a):
                log(f"{name}: {a.load} concurrent requests")
                res["saturation"] = saturate(client, ctx, model_dir.name, chunk, a.load)
        return res
    finally:
        try:
            srv.stop()
        except Exception as err:  # noqa: BLE001 - a slow or failing stop must not discard the figures
            res["stop_error"] = f"{type(err).__name__}: {err}"[:300]
            log(f"{name}: stopping the server failed: {res['stop_error']}")
        if built:  # later variants on these weights start from their own caches, as before
            import shutil

            shutil.rmtree(artifacts, ignore_errors=True)


# -- main ------------------------------------------------------------------------------------------

def over_budget(a) -> bool:
    return a.time_budget is not None and time.perf_counter() - T0 > a.time_budget


def cpu_name() -> str:
    try:
        model = next(l for l in open("/proc/cpuinfo") if l.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"cpu ({model}, {os.cpu_count()} cores)"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "grpcio", "videogen"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def print_table(variants: dict) -> None:
    cols = ("ready_s", "e2e_s", "first_frame_s", "step_s", "decode_s", "peak_mem_gib")
    print(f"\n{'variant':<20}" + "".join(f"{c.replace('peak_mem_gib', 'peak_GiB'):>14}" for c in cols))
    for name, r in variants.items():
        if "error" in r or "skipped" in r:
            print(f"{name:<20}  {r.get('skipped') or r.get('error')}")
            continue
        if name != "unet_tricks":
            print(f"{name:<20}" + "".join(f"{'-' if r.get(c) is None else format(r[c], '.3f'):>14}" for c in cols))


def main() -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU")
    p.add_argument("--steps", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--decode-chunk", type=int, help="decode_chunk_size (default 8; tiny 4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--variants", help=f"comma list of {','.join(ALL_VARIANTS)}")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--repeats", type=int, help="timed calls per variant (default: plain 1, server 2; tiny 5)")
    p.add_argument("--load", type=int, help="concurrent requests for the busy-fraction test (default: tiny 8, else 0)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="results folder (default $OUT or cwd)")
    p.add_argument("--workdir", help="where the weights go (default /tmp/videogen-bench-<tiny|full>)")
    p.add_argument("--time-budget", type=float, help="seconds; skip the remaining variants once exceeded")
    p.add_argument("--server-params", default="", help="k=v,k=v backend parameters added to every server variant")
    p.add_argument("--profile", action="store_true",
                   help="GPU: device time of one denoising step by kernel kind (torch.profiler) for server variants")
    a = p.parse_args()
    try:
        a.server_params = dict(kv.split("=", 1) for kv in a.server_params.split(",") if kv)
    except ValueError:
        sys.exit("--server-params: expected k=v,k=v")

    cuda = torch.cuda.is_available() and not a.tiny
    if not a.tiny and not cuda:
        sys.exit("full size needs a CUDA GPU; use --tiny on CPU")
    d = (64, 48, 8, 6, 4) if a.tiny else (1024, 576, 25, 25, 8)
    a.width, a.height, a.frames, a.steps, a.decode_chunk = (
        v if v is not None else dv for v, dv in zip((a.width, a.height, a.frames, a.steps, a.decode_chunk), d))
    a.plain_repeats = a.repeats or (5 if a.tiny else 1)
    a.server_repeats = a.repeats or (5 if a.tiny else 2)
    a.load = a.load if a.load is not None else (8 if a.tiny else 0)
    variants = (a.variants or ("plain,server" if a.tiny else "plain,server,server_lowmem,server_compile")).split(",")
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        sys.exit(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    cpu_threads = None if cuda else torch.get_num_threads()  # the server uses the same threads as plain
    malloc_tuned = False if cuda else tune_malloc()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(a.workdir or f"/tmp/videogen-bench-{'tiny' if a.tiny else 'full'}")
    name = "svd-tiny" if a.tiny else "svd-xt"

    results = {
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
                 "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
                 "cpu_threads": torch.get_num_threads(), "malloc_tuned": malloc_tuned, **versions()},
        "params": {"mode": "tiny" if a.tiny else "full", "width": a.width, "height": a.height, "frames": a.frames,
                   "steps": a.steps, "decode_chunk_size": a.decode_chunk, "seed": a.seed, "dtype": str(dtype),
                   "compile_mode": a.compile_mode, "plain_repeats": a.plain_repeats,
                   "server_repeats": a.server_repeats, "load": a.load, "frame_encoding": "png",
                   "stream_video": True, "variants": variants, "time_budget": a.time_budget,
                   "server_params": a.server_params},
        "variants": {}, "derived": {}}
    path = out / "bench_results.json"

    def save():  # atomic: a call killed mid-write keeps the previous complete file
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)

    log(f"{results['meta']['device']}: {a.width}x{a.height}, {a.frames} frames, {a.steps} steps, "
        f"decode_chunk_size {a.decode_chunk}, {dtype}; variants {variants}")
    # On a thread that ends: a thread that ran parallel CPU ops keeps its OpenMP team, and more teams than
    # cores slow every other team (see tests/integration/test_threads.py); the main thread stays clean.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        results["model"] = pool.submit(prepare_weights, workdir, name, a.tiny, device, dtype).result()
    save()
    ctx = Ctx(a, device, dtype, workdir / "repo" / name / "1", test_image(a.width, a.height), cpu_threads)
    for v in variants:
        if over_budget(a):
            results["variants"][v] = {"skipped": f"time budget {a.time_budget:.0f}s exceeded"}
            log(f"{v}: skipped (time budget)")
            save()
            continue
        log(f"{v}: start")
        try:
            if v == "unet_tricks":
                r = run_unet_tricks(ctx)
            elif v.startswith("plain"):
                r = run_plain(ctx, compiled=v == "plain_compile", lowmem=v == "plain_lowmem")
            else:
                def checkpoint(partial: dict, v: str = v) -> None:
                    results["variants"][v] = partial
                    save()

                r = run_server(ctx, v, workdir / "repo" / name, checkpoint)
        except Exception as err:  # noqa: BLE001 - record and go on with the next variant
            traceback.print_exc()
            partial = results["variants"].get(v, {})
            r = {**partial, "error": f"{type(err).__name__}: {err}"}
        results["variants"][v] = r  # recorded before freeing: a sticky device error there must not lose it
        log(f"{v}: " + ", ".join(f"{k} {r.get(k)}" for k in ("ready_s", "e2e_s", "step_s", "peak_mem_gib", "error")
                                 if k in r))
        save()
        try:
            free_memory(reset_dynamo="compile" in v)  # the variant's models are unreferenced by now
        except Exception as err:  # noqa: BLE001 - a device left broken: later variants will say so
            log(f"{v}: freeing memory failed: {type(err).__name__}: {err}")

    vs, der = results["variants"], results["derived"]
    plain, server = vs.get("plain", {}), vs.get("server", {})
    if plain.get("total_s") and server.get("e2e_s"):
        der["overhead_ratio_e2e"] = round(server["e2e_s"] / plain["total_s"], 3)
        der["overhead_ratio_e2e_min"] = round(min(r["e2e_s"] for r in server["runs"])
                                              / min(r["total_s"] for r in plain["runs"]), 3)
        if plain.get("median_step_s") and server.get("step_s"):
            der["step_ratio"] = round(server["step_s"] / plain["median_step_s"], 3)
    if "saturation" in server:
        der["busy_fraction"] = server["saturation"].get("busy_fraction")
        der["videos_per_s_under_load"] = server["saturation"].get("videos_per_s")
    results["meta"]["wall_s"] = round(time.perf_counter() - T0, 1)
    save()
    print_table(vs)
    if "overhead_ratio_e2e" in der:
        print(f"\noverhead ratio, server e2e (client side) / plain total: {der['overhead_ratio_e2e']:.3f} "
              f"(medians {server['e2e_s']:.3f}s / {plain['total_s']:.3f}s of {len(server['runs'])} / "
              f"{len(plain['runs'])} runs), {der['overhead_ratio_e2e_min']:.3f} (best runs)")
    if der.get("busy_fraction") is not None:
        sat = server["saturation"]
        print(f"busy fraction under load ({sat['completed']}/{sat['requests']} concurrent requests, 1 instance): "
              f"{der['busy_fraction']:.3f}  (wall {sat['wall_s']:.2f}s, {sat['videos_per_s']:.2f} videos/s)")
    sat_errors = server.get("saturation", {}).get("errors") or []
    if sat_errors:
        print(f"load test: {len(sat_errors)} requests failed, e.g. {sat_errors[0]}")
    for v, r in vs.items():
        if r.get("max_abs_diff_vs_plain") is not None:
            print(f"{v}: frames vs the plain pipeline's (all {a.frames}): max |diff| {r['max_abs_diff_vs_plain']} "
                  f"of 255, PSNR {r['psnr_vs_plain_db']} dB")
        if "compile_stats_after_other_params" in r:
            print(f"{v}: graphs {r['compile_stats_after_timed_runs']} after the timed runs, "
                  f"{r['compile_stats_after_other_params']} after requests with other seed, fps, motion bucket and "
                  f"decode_chunk_size {r['other_decode_chunk_sizes']}")
        if "profile" in r and "per_step_s_by_kind" in r["profile"]:
            pr = r["profile"]
            print(f"{v}: device time per step {pr['per_step_kernel_sum_s']} s (measured step {pr['step_s_measured']} s): "
                  + ", ".join(f"{k} {t}" for k, t in sorted(pr["per_step_s_by_kind"].items(), key=lambda kv: -kv[1])))
    if "unet_tricks" in vs and "error" not in vs["unet_tricks"]:
        print("\nunet_tricks (eager UNet forward, guidance batch):")
        for k, r in vs["unet_tricks"].items():
            if isinstance(r, dict):
                print(f"  {k:<16} {r}")
    if device == "cpu":
        print("peak_GiB on CPU: process RSS, plain the lifetime peak (the weights' build included), the server the "
              "resident size after its run (the same process, after plain): not comparable with each other")
    print(f"results: {path}")
    failed = [v for v, r in vs.items() if isinstance(r, dict) and "error" in r]
    if failed or sat_errors:  # (a script or CI running the bench must see it: the table alone exits 0)
        print(f"failed: {', '.join(failed + (['load test'] if sat_errors else []))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
