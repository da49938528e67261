"""What the kernel benches (attention_bench, conv_bench, upsample_bench) share: device time per call with
CUDA events, in a CUDA graph as the server's graphs run kernels, their common arguments, and a JSON file
written whole after each shape (a call cut short keeps what it measured)."""
from __future__ import annotations

import argparse
import json
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


def no_gpu(name: str, args: argparse.Namespace) -> bool:
    """True (said on stderr) when a run without --tiny finds no CUDA GPU."""
    if args.tiny or torch.cuda.is_available():
        return False
    print(f"{name}: needs a CUDA GPU (or --tiny)", file=sys.stderr)
    return True
