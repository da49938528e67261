"""The VAE decoder's convolutions, one shape at a time, as the compiled server runs them: every distinct
convolution of one 8-frame decode chunk at 1024x576 (SVD-XT's decoder, its temporal convolutions as
`temporal_convs_2d` makes them), float16 channels-last on a GPU, with cuDNN's heuristic choice of kernel
(the server's default) and with cuDNN's timed choice (`cudnn.benchmark`, the server's `cudnn_benchmark`);
the temporal ones also as the stock 3-d convolution (channels-last 3-d) both ways; and the temporal ones
of the last, one-frame chunk (25 frames in chunks of 8 end with one), also as their middle tap's 1x1
convolution (`middle_tap`), what FramesConv2d runs for one frame since the twenty-first session.

Why: run 6 decoded 25 frames in 0.92 s where their ~173 TFLOP take ~0.28 s at the UNet's convolution rate,
and run 7's decode profile had 31 calls of an sm80 cuDNN kernel (`..._indexed_wo_smem_..._tilesize128x32x16`,
3.7 ms a call) whose layer nobody had identified (the one-frame chunk has 29 temporal convolutions). This
names each shape's kernel and its rate.

For each shape and way: milliseconds per call (10 calls in a CUDA graph, replayed, the median of --iters),
TFLOP/s, the first call's seconds (cuDNN's timing, with benchmark), the kernels the call ran (the profiler's
names, longest first), the largest difference from the first way. Then, per configuration of the server
(`heuristic`: the default; `benchmark`: cudnn_benchmark; `heuristic_before`: the default before the middle
tap; `conv3d` and `conv3d_benchmark`: without temporal_convs_2d) and `best` (each shape's fastest way), the
ms of an 8-frame chunk's convolutions, of the one-frame chunk's temporal ones, and of a 25-frame video's
(3 chunks and those). Prints a table and writes JSON (after each shape).

cuDNN keeps the plan it found for a shape, heuristic or timed, in one cache whose key does not hold the mode,
so the timed ways run in a process of their own (this script again, `--mode benchmark`, its JSON beside
--out as `.benchmark.json`), merged into the rows at the end; each process's first way is its `reference`.

    python bench/conv_bench.py --out conv.json
    python bench/conv_bench.py --out c.json --tiny   # the script itself, on the CPU (float32, tiny shapes)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import graph_calls, no_gpu, parser, save_json, time_calls  # a script beside this one

CHUNK = 8
#: full chunks of 8 frames in a 25-frame video, then one chunk of one frame
FULL_CHUNKS = 3
#: (count per 8-frame chunk, kind, channels in, channels out, kernel, height, width) of SVD-XT's decoder at
#: 1024x576 (latents 72x128); kind "spatial" is a Conv2d over [8, C, H, W], kind "temporal" a (3, 1, 1)
#: convolution over the frames ([1, C, 8, H, W]). tests/unit/test_conv_bench.py checks it against the model.
SHAPES = (
    (1, "spatial", 4, 512, 3, 72, 128),
    (10, "spatial", 512, 512, 3, 72, 128),
    (10, "temporal", 512, 512, 3, 72, 128),
    (7, "spatial", 512, 512, 3, 144, 256),
    (6, "temporal", 512, 512, 3, 144, 256),
    (1, "spatial", 512, 512, 3, 288, 512),
    (1, "spatial", 512, 256, 3, 288, 512),
    (1, "spatial", 512, 256, 1, 288, 512),
    (5, "spatial", 256, 256, 3, 288, 512),
    (6, "temporal", 256, 256, 3, 288, 512),
    (1, "spatial", 256, 256, 3, 576, 1024),
    (1, "spatial", 256, 128, 3, 576, 1024),
    (1, "spatial", 256, 128, 1, 576, 1024),
    (5, "spatial", 128, 128, 3, 576, 1024),
    (6, "temporal", 128, 128, 3, 576, 1024),
    (1, "spatial", 128, 3, 3, 576, 1024),
    (1, "temporal", 3, 3, 3, 576, 1024),
)
#: the last, one-frame chunk's temporal convolutions (kind "temporal1": a kernel of 3 frames over one),
#: which FramesConv2d now runs as their middle tap's 1x1 convolution ("middle_tap")
ONE_FRAME_SHAPES = tuple((n, "temporal1", *rest) for n, kind, *rest in SHAPES if kind == "temporal")
TINY_SHAPES = ((2, "spatial", 8, 8, 3, 6, 8), (1, "spatial", 8, 4, 1, 6, 8), (3, "temporal", 8, 8, 3, 6, 8),
               (3, "temporal1", 8, 8, 3, 6, 8))
WAYS = {"spatial": ("conv2d", "conv2d_benchmark"),
        "temporal": ("frames2d", "frames2d_benchmark", "conv3d", "conv3d_benchmark"),
        "temporal1": ("frames2d", "frames2d_benchmark", "conv3d", "conv3d_benchmark", "middle_tap")}


def frames_of(kind: str, tiny: bool = False) -> int:
    return 1 if kind == "temporal1" else 2 if tiny else CHUNK


def flop(kind: str, cin: int, cout: int, k: int, h: int, w: int, frames: int = CHUNK) -> int:
    """What the convolution computes (a one-frame temporal one: its kernel's 3 taps, 2 over padding)."""
    taps = k * k if kind == "spatial" else k
    return 2 * frames * h * w * cin * cout * taps


def label(shape) -> str:
    _, kind, cin, cout, k, h, w = shape
    return f"{kind} {cin}->{cout} k{k} {h}x{w}"


def ways(kind: str, cin: int, cout: int, k: int, h: int, w: int, frames: int, device, dtype, g) -> dict:
    """way -> (fn, args): the inputs as the compiled decoder holds them (channels-last)."""
    if kind == "spatial":
        x = torch.randn(frames, cin, h, w, device=device, dtype=dtype, generator=g).contiguous(
            memory_format=torch.channels_last)
        weight = (torch.randn(cout, cin, k, k, device=device, dtype=dtype, generator=g) / (k * cin ** 0.5)).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(cout, device=device, dtype=dtype, generator=g)
        fn = lambda x, weight, bias: F.conv2d(x, weight, bias, padding=k // 2)
        return {"conv2d": (fn, (x, weight, bias)), "conv2d_benchmark": (fn, (x, weight, bias))}
    # [B*F, C, H, W] channels-last, permuted to [B, C, F, H, W] by the temporal block: a view
    x = torch.randn(frames, cin, h, w, device=device, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last).unsqueeze(0).transpose(1, 2)
    weight = torch.randn(cout, cin, k, 1, 1, device=device, dtype=dtype, generator=g) / (k * cin ** 0.5)
    bias = torch.randn(cout, device=device, dtype=dtype, generator=g)
    w2d = weight.squeeze(-1).contiguous(memory_format=torch.channels_last)
    w3d = weight.contiguous(memory_format=torch.channels_last_3d)
    frames2d = lambda x, weight, bias: F.conv2d(x.flatten(3), weight, bias, padding=(k // 2, 0))
    conv3d = lambda x, weight, bias: F.conv3d(x, weight, bias, padding=(k // 2, 0, 0)).flatten(3)
    out = {"frames2d": (frames2d, (x, w2d, bias)), "frames2d_benchmark": (frames2d, (x, w2d, bias)),
           "conv3d": (conv3d, (x, w3d, bias)), "conv3d_benchmark": (conv3d, (x, w3d, bias))}
    if kind == "temporal1":  # FramesConv2d's one-frame form
        middle = w2d[:, :, k // 2:k // 2 + 1]
        out["middle_tap"] = (lambda x, weight, bias: F.conv2d(x.flatten(3), weight, bias), (x, middle, bias))
    return out


def kernels_of(fn, args) -> list[list]:
    """[name, ms] of the device kernels one call ran, longest first (the profiler's names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    return [[name[:160], round(ms, 4)] for name, ms in sorted(rows, key=lambda r: -r[1])[:3]]


#: the server's configurations: which way each kind of shape runs
CONFIGS = {"heuristic": {"spatial": "conv2d", "temporal": "frames2d", "temporal1": "middle_tap"},  # the default
           "benchmark": {"spatial": "conv2d_benchmark", "temporal": "frames2d_benchmark",  # cudnn_benchmark
                         "temporal1": "middle_tap"},
           "heuristic_before": {"spatial": "conv2d", "temporal": "frames2d", "temporal1": "frames2d"},  # <= 20th
           "conv3d": {"spatial": "conv2d", "temporal": "conv3d", "temporal1": "conv3d"},  # no temporal_convs_2d
           "conv3d_benchmark": {"spatial": "conv2d_benchmark", "temporal": "conv3d_benchmark",
                                "temporal1": "conv3d_benchmark"}}


def totals(rows: list[dict]) -> dict:
    """ms per configuration (CONFIGS) and `best` (each shape's fastest way): `chunk_ms`, an 8-frame chunk's
    convolutions; `one_frame_temporal_ms`, the last chunk's temporal ones; `video_ms`, a 25-frame video's
    3 chunks and that (the one-frame chunk's spatial convolutions are not timed)."""
    names = [*CONFIGS, "best"]
    chunk, one = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for r in rows:
        ms = {w: e["ms"] for w, e in r["ways"].items() if "ms" in e}
        into = one if r["kind"] == "temporal1" else chunk
        for name, config in CONFIGS.items():
            into[name] += r["count"] * ms.get(config[r["kind"]], math.nan)
        into["best"] += r["count"] * min(ms.values(), default=math.nan)
    return {"chunk_ms": {w: round(v, 3) for w, v in chunk.items()},
            "one_frame_temporal_ms": {w: round(v, 3) for w, v in one.items()},
            "video_ms": {w: round(FULL_CHUNKS * chunk[w] + one[w], 3) for w in names}}


def measure(args, result: dict, benchmark: bool) -> None:
    """Times the ways of one cuDNN mode into result["shapes"] (rows made or extended), saving after each shape.
    One mode a process: cuDNN keeps the plan it found for a shape, heuristic or timed, in one cache whose key
    does not include the mode, so a process that ran a shape by heuristic never times it (torch's Conv_v8)."""
    cuda = not args.tiny
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.backends.cudnn.benchmark = benchmark
    g = torch.Generator(device=device).manual_seed(0)
    shapes = TINY_SHAPES if args.tiny else ONE_FRAME_SHAPES + SHAPES  # the quick one-frame ones first
    for i, shape in enumerate(shapes):
        count, kind, cin, cout, k, h, w = shape
        frames = frames_of(kind, args.tiny)
        work = flop(kind, cin, cout, k, h, w, frames)
        if i == len(result["shapes"]):
            result["shapes"].append({"shape": label(shape), "count": count, "kind": kind, "frames": frames,
                                     "tflop_per_call": round(work / 1e12, 4), "ways": {}})
        row = result["shapes"][i]
        ref = None
        with torch.inference_mode():
            for way, (fn, fargs) in ways(kind, cin, cout, k, h, w, frames, device, dtype, g).items():
                if way.endswith("_benchmark") != benchmark:
                    continue
                entry = row["ways"][way] = {}
                try:
                    t0 = time.perf_counter()
                    out = fn(*fargs)
                    if cuda:
                        torch.cuda.synchronize()
                    entry["first_call_s"] = round(time.perf_counter() - t0, 3)  # with benchmark: cuDNN's timing
                    if ref is None:  # the first way of this process's mode
                        ref, entry["reference"] = out.float(), True
                    else:
                        entry["max_abs_diff"] = float((out.float() - ref).abs().max())
                    out = None
                    ms = time_calls(fn, fargs, args.warmup, args.iters, cuda)
                    entry["ms_eager"] = round(ms, 4)
                    if cuda:
                        ms = entry["ms_graph"] = round(graph_calls(fn, fargs, args.iters)[0], 4)
                        entry["kernels"] = kernels_of(fn, fargs)
                except Exception as exc:  # noqa: BLE001 - a way the device refuses is a result
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    continue
                entry["ms"] = round(ms, 4)
                entry["tflops"] = round(work / (ms / 1e3) / 1e12, 1)
        del ref
        result.update(totals(result["shapes"]))
        save_json(args.out, result)


def main(argv=None) -> int:
    ap = parser(__doc__, iters=5)
    ap.add_argument("--mode", choices=("both", "heuristic", "benchmark"), default="both",
                    help="cuDNN's heuristic kernels, its timed ones, or both (the timed ones in a process of "
                         "their own)")
    args = ap.parse_args(argv)
    if no_gpu("conv_bench", args):
        return 2
    cuda = not args.tiny
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (--tiny)", "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version() if cuda else None,
              "dtype": "float16" if cuda else "float32", "date": time.strftime("%Y-%m-%d"), "shapes": []}
    measure(args, result, benchmark=args.mode == "benchmark")
    if args.mode == "both":
        import subprocess

        child_out = args.out + ".benchmark.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--out", child_out, "--mode", "benchmark",
               "--warmup", str(args.warmup), "--iters", str(args.iters)] + (["--tiny"] if args.tiny else [])
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its rows say what ran
        try:
            with open(child_out) as f:
                child = json.load(f)
        except (OSError, ValueError):
            child = {"shapes": []}
        result["benchmark_process"] = {"returncode": run.returncode, "complete": child.get("complete", False),
                                       "stderr_tail": run.stderr[-600:]}
        for row, theirs in zip(result["shapes"], child["shapes"]):
            row["ways"].update(theirs["ways"])  # the same shapes in the same order
        result.update(totals(result["shapes"]))
    save_json(args.out, result, done=True)
    print(f"{result['device']}, torch {result['torch']}, cuDNN {result['cudnn']}, {result['dtype']}")
    for row in result["shapes"]:
        cells = []
        for way, e in row["ways"].items():
            top = e.get("kernels", [[""]])[0][0] if e.get("kernels") else ""
            cells.append(f"{way} {e.get('ms', math.nan):.3f} ms {e.get('tflops', math.nan):.0f} TF/s {top[:60]}"
                         if "ms" in e else f"{way} {e.get('error', '')[:60]}")
        print(f"{row['count']:>3} x {row['shape']:<32} F={row['frames']} " + " | ".join(cells))
    for key in ("chunk_ms", "one_frame_temporal_ms", "video_ms"):
        print(f"{key}: " + ", ".join(f"{w} {v}" for w, v in result[key].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
