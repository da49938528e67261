"""SVD-XT's GEGLU feed-forward input layers, stock and fused (the server's `fused_geglu`), at the shapes of the
benchmark's workload (1024x576, 25 frames, a guided step's batch of 2 x 25): float16 on a GPU.

Ways:
  stock           diffusers' GEGLU: linear(x, W, b).chunk(2, -1), value * gelu(gate), under torch.compile (the
                  projection's output, twice the result's width, written and read back by the GELU kernel)
  proj            the projection alone, under torch.compile (the GEMM's share of stock)
  fused           videogen_server.backends.svd.geglu_kernel.geglu_linear: one Triton kernel, eager (Triton's
                  autotuner times its tile shapes at the first call)
  fused_compiled  the same called inside torch.compile(fullgraph=True), as the server's compiled UNet runs it

For each shape: milliseconds per call (CUDA events; 10 calls captured in a CUDA graph and replayed, the median
of --iters replays, as the server's graphs run them), TFLOP/s of the projection's arithmetic, the largest
difference from the float64 computation for stock and fused; then each way's milliseconds per step (the
shape's calls a step) and `best`: "true" when fused_compiled beats stock over a step, else "false" (what
the server's `fused_geglu` should be). Also the largest difference in bfloat16 at the first shape. Prints a
table and writes JSON (after each shape).

    python bench/geglu_bench.py --out geglu.json
    TRITON_INTERPRET=1 python bench/geglu_bench.py --out g.json --tiny   # the script, on the CPU (interpreted)
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import print_ways, save_json, start, svd_module, time_into  # a script beside this one

#: (tokens, channels in, result channels, calls a step) at 1024x576, 25 frames, guidance: torch's forward hooks
#: on the full-size UNet on meta tensors (tests/unit/test_geglu_bench.py checks them): each transformer of a
#: level has a spatial feed-forward and a temporal block's ff_in and ff, GEGLU all
SHAPES = ((460800, 320, 1280, 15), (115200, 640, 2560, 15), (28800, 1280, 5120, 15), (7200, 1280, 5120, 3))
TINY_SHAPES = ((96, 16, 24, 2), (40, 32, 64, 1))
WAYS = ("stock", "proj", "fused", "fused_compiled")


def flop(tokens: int, k: int, n: int) -> int:
    """The projection's arithmetic: tokens x k into 2n."""
    return 2 * tokens * k * 2 * n


def stock(x, w, b):
    value, gate = F.linear(x, w, b).chunk(2, -1)
    return value * F.gelu(gate)


def exact(x, w, b):
    return stock(x.double(), w.double(), b.double())


def ways(kernel, compiled: bool) -> dict:
    wrap = (lambda fn: torch.compile(fn, fullgraph=True)) if compiled else (lambda fn: fn)
    return {"stock": wrap(stock), "proj": wrap(F.linear), "fused": kernel.geglu_linear,
            "fused_compiled": wrap(lambda x, w, b: kernel.geglu_linear(x, w, b))}


def totals(rows: list[dict]) -> tuple[dict, str]:
    """Each way's ms a step; "true" if the compiled fused kernel beats stock over a step."""
    per_step = {w: sum(r["calls_per_step"] * r["ways"].get(w, {}).get("ms", math.nan) for r in rows) for w in WAYS}
    best = "true" if per_step["fused_compiled"] < per_step["stock"] else "false"  # NaN (a failed way): false
    return per_step, best


def main(argv=None) -> int:
    started = start("geglu_bench", __doc__, argv)
    if started is None:
        return 2
    args, device, dtype, result = started
    try:
        kernel = svd_module("geglu_kernel")
        result["triton"] = __import__("triton").__version__
        result["interpreted"] = kernel.INTERPRETED
    except ImportError as exc:  # the stock ways still say what the layers cost
        kernel, result["kernel_error"] = None, f"{type(exc).__name__}: {exc}"
    g = torch.Generator(device=device).manual_seed(0)
    fns = ways(kernel, compiled=not args.tiny) if kernel is not None else {"stock": stock, "proj": F.linear}
    for tokens, k, n, calls in (TINY_SHAPES if args.tiny else SHAPES):
        x = torch.randn(tokens, k, device=device, dtype=dtype, generator=g)
        w = torch.randn(2 * n, k, device=device, dtype=dtype, generator=g) / k ** 0.5
        b = torch.randn(2 * n, device=device, dtype=dtype, generator=g) / 10
        work = flop(tokens, k, n)
        row = {"tokens": tokens, "in": k, "out": n, "calls_per_step": calls, "tflop_per_call": round(work / 1e12, 4),
               "ways": {}}
        ref = exact(x, w, b).float()
        with torch.inference_mode():
            for way in WAYS:
                entry = row["ways"][way] = {}
                if way not in fns:
                    entry["error"] = result["kernel_error"]
                    continue
                fn = fns[way]
                try:
                    t0 = time.perf_counter()
                    out = fn(x, w, b)  # the first call: Triton's autotuning, torch.compile's compile
                    entry["first_call_s"] = round(time.perf_counter() - t0, 2)
                    if way != "proj":
                        entry["max_abs_err"] = float((out.float() - ref).abs().max())
                    time_into(entry, fn, (x, w, b), work, args)
                except Exception as exc:  # noqa: BLE001 - a way the device or the compiler refuses is a result
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    out = None
        result["shapes"].append(row)
        del x, ref
        save_json(args.out, result)
    if kernel is not None and not args.tiny:  # bfloat16 on the GPU (the interpreter's bfloat16 dot is wrong)
        tokens, k, n, _ = SHAPES[0]
        try:  # a failure here is a result too: the float16 figures and `best` below must still be written
            x, w = torch.randn(tokens, k, device=device, generator=g), torch.randn(2 * n, k, device=device, generator=g)
            x, w, b = x.bfloat16(), (w / k ** 0.5).bfloat16(), torch.randn(2 * n, device=device, generator=g).bfloat16()
            ref = exact(x, w, b)
            result["bfloat16_max_abs_err"] = {
                "stock": float((stock(x, w, b).double() - ref).abs().max()),
                "fused": float((kernel.geglu_linear(x, w, b).double() - ref).abs().max())}
        except Exception as exc:  # noqa: BLE001
            result["bfloat16_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            x = w = b = ref = None
    per_step, best = totals(result["shapes"])
    result["ms_per_step"] = {w: round(v, 3) for w, v in per_step.items()}
    result["best"] = best
    save_json(args.out, result, done=True)
    print(f"{result['device']}, torch {result['torch']}, triton {result.get('triton', '-')}, {result['dtype']}")
    print_ways(result["shapes"], WAYS, f"{'tokens':>7} {'in':>5} {'out':>5} {'calls':>5}",
               lambda r: f"{r['tokens']:>7} {r['in']:>5} {r['out']:>5} {r['calls_per_step']:>5}")
    print("ms a step: " + ", ".join(f"{w} {v}" for w, v in result["ms_per_step"].items()))
    if "bfloat16_max_abs_err" in result:
        print(f"bfloat16 max |err|: {result['bfloat16_max_abs_err']}")
    if "bfloat16_error" in result:
        print(f"bfloat16: {result['bfloat16_error']}")
    print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
