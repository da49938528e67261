"""What the kernel benches (attention_bench, conv_bench, upsample_bench, geglu_bench) share: device time per
call with CUDA events, in a CUDA graph as the server's graphs run kernels, their common arguments, start,
table and module loader, and a JSON file written whole after each shape (a call cut short keeps what it
measured)."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch


def graph_calls(fn, args, iters: int, reps: int = 10):
    """Milliseconds per call with `reps` calls captured in one CUDA graph and replayed (the median of
    `iters` replays): the kernel without the host's launch overhead, as the server's CUDA graphs run
    it. Returns (ms, the last captured call's output after a replay). Raises if the calls cannot be
    captured: what a compiled server with CUDA graphs would meet."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # torch's rule: run once on a side stream before capturing
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            out = fn(*args)
    return statistics.median(device_ms(graph.replay) / reps for _ in range(iters)), out


def device_ms(fn) -> float:
    """Milliseconds of device time between CUDA events around one fn()."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_calls(fn, args, warmup: int, iters: int, cuda: bool) -> float:
    """Milliseconds per call, the median of `iters`."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        if cuda:
            times.append(device_ms(lambda: fn(*args)))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_into(entry: dict, fn, fn_args: tuple, work: int, args: argparse.Namespace) -> None:
    """Times fn(*fn_args) into entry: `ms_eager` (host-timed on the CPU, CUDA events on a GPU), on a GPU
    `ms_graph` (`graph_calls`), and `ms` (the graph's on a GPU) with `tflops` for `work` FLOP a call."""
    ms = entry["ms_eager"] = round(time_calls(fn, fn_args, args.warmup, args.iters, not args.tiny), 4)
    if not args.tiny:
        ms, _ = graph_calls(fn, fn_args, args.iters)
        entry["ms_graph"] = round(ms, 4)
    entry["ms"] = round(ms, 4)
    entry["tflops"] = round(work / (ms / 1e3) / 1e12, 1)


def print_ways(rows: list[dict], ways, head: str, lead, width: int = 17) -> None:
    """A table: `head`, then per row `lead(row)` and each way's ms and TFLOP/s (nan where it failed)."""
    print(f"{head} " + " ".join(f"{w + ' ms':>{width}} {'TF/s':>5}" for w in ways))
    for row in rows:
        cells = [f"{row['ways'][w].get('ms', math.nan):>{width}.3f} {row['ways'][w].get('tflops', math.nan):>5.0f}"
                 for w in ways]
        print(f"{lead(row)} " + " ".join(cells))


def save_json(path: str, result: dict, done: bool = False) -> None:
    """Writes `result` with `complete: done`, whole or not at all."""
    result["complete"] = done
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def parser(doc: str, iters: int, warmup: int = 3) -> argparse.ArgumentParser:
    """--out, --warmup, --iters and --tiny, the description the script docstring's first paragraph."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--tiny", action="store_true", help="CPU, float32, tiny shapes: checks the script, not kernels")
    return ap


def svd_module(name: str):
    """videogen_server.backends.svd.<name>: installed, else this tree's file (accel and geglu_kernel import
    torch, and Triton, alone), so that a bench runs where only torch is, e.g. the device call that carries
    FA4 instead of the wheels."""
    import importlib

    try:
        return importlib.import_module(f"videogen_server.backends.svd.{name}")
    except ImportError:  # (a dependency of the module itself, e.g. Triton, fails the tree's copy too)
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "server", "videogen_server",
                            "backends", "svd", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"videogen_tree_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def start(name: str, doc: str, argv, iters: int = 10):
    """A float16 bench's start: (args, device, dtype, result header), or None (said) without a GPU or --tiny
    (float32 on the CPU)."""
    args = parser(doc, iters=iters).parse_args(argv)
    if no_gpu(name, args):
        return None
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.float16)
    result = {"device": "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": str(dtype).removeprefix("torch."), "date": time.strftime("%Y-%m-%d"), "shapes": []}
    return args, device, dtype, result


def no_gpu(name: str, args: argparse.Namespace) -> bool:
    """True (said on stderr) when a run without --tiny finds no CUDA GPU."""
    if args.tiny or torch.cuda.is_available():
        return False
    print(f"{name}: needs a CUDA GPU (or --tiny)", file=sys.stderr)
    return True
