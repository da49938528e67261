"""SVD-XT's self-attention calls, one kernel at a time: torch's SDPA backends (cuDNN, flash, efficient) and,
when the flash-attn-4 package imports, FlashAttention-4, at the shapes one denoising step of the benchmark's
workload makes (1024x576, 25 frames, classifier-free guidance: a UNet batch of 2 x 25), float16 on a GPU.

For each shape: milliseconds per call (CUDA events, the median of --iters after --warmup calls: `ms_eager`;
`ms_graph` with 10 calls captured in a CUDA graph and replayed, which leaves out the host's launch overhead
as the server's CUDA graphs do, and says whether the kernel can be captured at all; `ms` is `ms_graph`
where there is one), TFLOP/s (4 x batch x heads x tokens^2 x head_dim per call) and the largest difference
from the first kernel listed (cuDNN by default); then each kernel's attention time per step (the calls of
one step: 5 spatial and 5 temporal self-attentions per level on levels 1-3, one of each in the middle
block). Inputs come as the UNet's processors give them: [batch, tokens, heads, 64] out of the linear
layers, transposed (a view) for SDPA, as is for FA4. Prints a table and writes JSON (after each shape).

    python bench/attention_bench.py --out attention.json [--kernels cudnn,flash,efficient,fa4]
    python bench/attention_bench.py --out a.json --tiny   # the script itself, on the CPU (float32, tiny shapes)
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import graph_calls, no_gpu, parser, save_json, time_calls  # a script beside this one

HEAD_DIM = 64
FRAMES, BATCH = 25, 2  # frames, and the guidance's two halves
#: (level, tokens per frame of the latent 72x128 at that level, heads, calls of each kind per step)
LEVELS = ((1, 72 * 128, 5, 5), (2, 36 * 64, 10, 5), (3, 18 * 32, 20, 5), ("mid", 9 * 16, 20, 1))


def shapes(tiny: bool = False):
    """(name, batch, tokens, heads, calls a step) of every self-attention shape of one step (tiny: 1/64 of
    the pixels, 4 frames)."""
    frames = 4 if tiny else FRAMES
    for level, pixels, heads, calls in LEVELS:
        pixels = max(pixels // 64, 4) if tiny else pixels
        yield f"spatial L{level}", BATCH * frames, pixels, heads, calls  # over a frame's pixels
        yield f"temporal L{level}", BATCH * pixels, frames, heads, calls  # over a pixel's frames


def flop(batch: int, tokens: int, heads: int) -> int:
    """One self-attention's arithmetic: two matrix products of tokens x tokens x head_dim per head."""
    return 4 * batch * heads * tokens * tokens * HEAD_DIM


def fa4_kernel():
    """FA4's forward over [batch, tokens, heads, head_dim], or None with the reason it cannot run."""
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception as exc:  # noqa: BLE001 - any failure to import means: not here
        return None, f"{type(exc).__name__}: {exc}"

    def run(q, k, v):
        out = flash_attn_func(q, k, v, softmax_scale=HEAD_DIM ** -0.5, causal=False)
        return out[0] if isinstance(out, tuple) else out
    return run, None


def sdpa_kernel(backend):
    from torch.nn.attention import sdpa_kernel as only

    def run(q, k, v):
        with only([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return run


def _save(path: str, result: dict, per_step: dict, done: bool = False) -> None:
    result["per_step_s"] = {k: (None if math.isnan(v) else round(v, 4)) for k, v in per_step.items()}
    save_json(path, result, done)


def main(argv=None) -> int:
    ap = parser(__doc__, iters=10)
    ap.add_argument("--kernels", default="cudnn,flash,efficient,fa4")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    args = ap.parse_args(argv)
    if no_gpu("attention_bench", args):
        return 2
    from torch.nn.attention import SDPBackend

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    if args.tiny:
        args.dtype = "float32"
    kernels, skipped = {}, {}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    known = (*backends, "fa4")
    unknown = [n for n in args.kernels.split(",") if n not in known]
    if unknown:
        print(f"attention_bench: --kernels: unknown {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for name in args.kernels.split(","):
        if name == "fa4":
            fn, why = fa4_kernel()
            if fn is None:
                skipped[name] = why
                continue
            kernels[name] = fn
        else:
            kernels[name] = sdpa_kernel(backends[name])
    result = {"device": "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "date": time.strftime("%Y-%m-%d"), "skipped": skipped, "shapes": []}
    per_step = dict.fromkeys(kernels, 0.0)
    g = torch.Generator(device=device).manual_seed(0)
    for label, batch, tokens, heads, calls in shapes(args.tiny):
        q, k, v = (torch.randn(batch, tokens, heads, HEAD_DIM, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        work = flop(batch, tokens, heads)
        row = {"shape": label, "batch": batch, "tokens": tokens, "heads": heads, "calls_per_step": calls,
               "tflop_per_call": round(work / 1e12, 4), "kernels": {}}
        ref = None
        for name, fn in kernels.items():
            entry = row["kernels"][name] = {}
            try:
                t0 = time.perf_counter()
                out = fn(q, k, v)
                if not args.tiny:
                    torch.cuda.synchronize()
                entry["first_call_s"] = round(time.perf_counter() - t0, 3)  # FA4 compiles its kernel here
                if ref is None:
                    ref = out.float()
                    entry["reference"] = True
                else:
                    entry["max_abs_diff"] = float((out.float() - ref).abs().max())
                ms = entry["ms_eager"] = round(time_calls(fn, (q, k, v), args.warmup, args.iters, not args.tiny), 4)
            except Exception as exc:  # noqa: BLE001 - a kernel refusing a shape is a result
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                per_step[name] = math.nan
                continue
            if not args.tiny:
                try:
                    ms, captured = graph_calls(fn, (q, k, v), args.iters)
                    entry["ms_graph"] = round(ms, 4)
                    entry["graph_matches_eager"] = bool(torch.equal(captured, out))
                    del captured
                except Exception as exc:  # noqa: BLE001 - not capturable: the server needs a mode without graphs
                    entry["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    torch.cuda.synchronize()
            del out
            entry["ms"] = round(ms, 4)
            entry["tflops"] = round(work / (ms / 1e3) / 1e12, 1)
            per_step[name] += calls * ms / 1e3
        result["shapes"].append(row)
        del q, k, v, ref
        _save(args.out, result, per_step)  # a call cut short keeps the shapes done
    _save(args.out, result, per_step, done=True)
    names = list(kernels)
    print(f"{result['device']}, torch {result['torch']}, {args.dtype}; skipped: {skipped or 'none'}")
    print(f"{'shape':<14} {'B':>6} {'S':>5} {'H':>3} " + " ".join(f"{n + ' ms':>11} {'TF/s':>6}" for n in names))
    for row in result["shapes"]:
        cells = []
        for n in names:
            e = row["kernels"].get(n, {})
            cells.append(f"{e.get('ms', float('nan')):>11.3f} {e.get('tflops', float('nan')):>6.0f}")
        print(f"{row['shape']:<14} {row['batch']:>6} {row['tokens']:>5} {row['heads']:>3} " + " ".join(cells))
    print("attention per step (s): " + ", ".join(f"{n} {v}" for n, v in result["per_step_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
