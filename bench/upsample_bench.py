"""SVD-XT's six upsamplers (nearest 2x, then a 3x3 convolution), one way of computing them at a time, at the
shapes of the benchmark's workload (1024x576, 25 frames): the UNet's three at a guided step's batch of 2 x 25,
the VAE decoder's three at an 8-frame chunk, float16 channels-last (what torch.compile makes of them) on a GPU.

Ways (the server's `fold_upsample`, videogen_server.backends.svd.accel.upsample_conv):
  stock       F.interpolate(nearest, 2x), then the 3x3 convolution (diffusers' Upsample2D)
  transposed  one stride-2 transposed convolution with the folded 4x4 taps, the fold included
  phases      one 2x2 convolution with 4x the output channels over the padded source, then the interleave
              (a copy here, eager; compiled, torch.compile fuses it into what reads it), the fold included
  *_conv      the convolution alone, its weights folded beforehand: the kernel, without the glue

For each shape: milliseconds per call (CUDA events; 10 calls captured in a CUDA graph and replayed, the median
of --iters replays, as the server's graphs run them; `ms_eager` without the graph), TFLOP/s of the stock
arithmetic (2 x pixels out x 9 x in x out channels: what each way computes, whatever it spends), the largest
difference from stock; then per way the UNet's milliseconds per step and the decoder's per video (25 frames:
3.125 chunks of 8), and the way the server should take (`best`: the way whose convolution alone gives the
least steps x 25 + decode, or "false" when none beats stock: compiled, the fold and the interleave are
cheap elementwise kernels or fused away). Prints a table and writes JSON (after each shape).

    python bench/upsample_bench.py --out upsample.json
    python bench/upsample_bench.py --out u.json --tiny   # the script itself, on the CPU (float32, tiny shapes)
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import print_ways, save_json, start, svd_module, time_into  # a script beside this one

STEPS, FRAMES, CHUNK = 25, 25, 8
#: (name, model, batch, channels in = out, source height, width) at 1024x576, 25 frames, guidance
SHAPES = (("unet up0", "unet", 2 * FRAMES, 1280, 9, 16), ("unet up1", "unet", 2 * FRAMES, 1280, 18, 32),
          ("unet up2", "unet", 2 * FRAMES, 640, 36, 64), ("vae up0", "vae", CHUNK, 512, 72, 128),
          ("vae up1", "vae", CHUNK, 512, 144, 256), ("vae up2", "vae", CHUNK, 256, 288, 512))
TINY_SHAPES = (("unet up0", "unet", 4, 16, 3, 4), ("vae up0", "vae", 2, 8, 6, 8))
WAYS = ("stock", "transposed", "phases", "transposed_conv", "phases_conv")


def flop(batch: int, channels: int, h: int, w: int) -> int:
    """The stock computation: a 3x3 convolution over the 2x-upsampled input."""
    return 2 * batch * (2 * h) * (2 * w) * 9 * channels * channels


def ways(weight: torch.Tensor, bias: torch.Tensor) -> dict:
    accel = svd_module("accel")
    upsample_conv, phase_weights = accel.upsample_conv, accel.phase_weights
    taps = accel.upsample_taps(weight)
    transposed = taps.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    w4 = phase_weights(weight).contiguous(memory_format=torch.channels_last)
    b4 = bias.repeat(4)
    return {
        "stock": lambda x: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1),
        "transposed": lambda x: upsample_conv(x, weight, bias, "transposed"),
        "phases": lambda x: upsample_conv(x, weight, bias, "phases"),
        "transposed_conv": lambda x: F.conv_transpose2d(x, transposed, bias, stride=2, padding=1),
        "phases_conv": lambda x: F.conv2d(x, w4, b4, padding=1),
    }


def totals(rows: list[dict]) -> tuple[dict, dict, str]:
    """Per way: the UNet's ms a step, the decoder's ms a video; and the way to serve with."""
    per_step = {w: 0.0 for w in WAYS}
    per_video = {w: 0.0 for w in WAYS}
    for row in rows:
        for w in WAYS:
            ms = row["ways"].get(w, {}).get("ms", math.nan)
            if row["model"] == "unet":
                per_step[w] += ms
            else:
                per_video[w] += ms * FRAMES / CHUNK
    # compiled, the fold is a few elementwise kernels over the weights and the phases' interleave is fused
    # into what reads it: the server's cost is nearer each way's convolution alone than its eager whole
    video = {w: STEPS * per_step[w] + per_video[w] for w in ("stock", "transposed_conv", "phases_conv")}
    fastest = min((w for w in ("transposed_conv", "phases_conv") if not math.isnan(video[w])), key=video.get,
                  default=None)
    best = fastest.removesuffix("_conv") if fastest and video[fastest] < video["stock"] else "false"
    return per_step, per_video, best


def main(argv=None) -> int:
    started = start("upsample_bench", __doc__, argv)
    if started is None:
        return 2
    args, device, dtype, result = started
    g = torch.Generator(device=device).manual_seed(0)
    for name, model, batch, ch, h, w in (TINY_SHAPES if args.tiny else SHAPES):
        x = torch.randn(batch, ch, h, w, device=device, dtype=dtype, generator=g).contiguous(
            memory_format=torch.channels_last)
        weight = (torch.randn(ch, ch, 3, 3, device=device, dtype=dtype, generator=g) / (3 * ch ** 0.5)).contiguous(
            memory_format=torch.channels_last)
        bias = torch.randn(ch, device=device, dtype=dtype, generator=g)
        work = flop(batch, ch, h, w)
        row = {"shape": name, "model": model, "batch": batch, "channels": ch, "source": [h, w],
               "tflop_per_call": round(work / 1e12, 4), "ways": {}}
        ref = None
        with torch.inference_mode():
            for way, fn in ways(weight, bias).items():
                entry = row["ways"][way] = {}
                try:
                    out = fn(x)
                    if ref is None:
                        ref, entry["reference"] = out.float(), True
                    elif out.shape == ref.shape:  # phases_conv: the phases, not yet interleaved
                        entry["max_abs_diff"] = float((out.float() - ref).abs().max())
                    time_into(entry, fn, (x,), work, args)
                except Exception as exc:  # noqa: BLE001 - a way the device refuses is a result
                    entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                finally:
                    out = None
        result["shapes"].append(row)
        del x, ref
        save_json(args.out, result)
    per_step, per_video, best = totals(result["shapes"])
    result["unet_ms_per_step"] = {k: round(v, 3) for k, v in per_step.items()}
    result["vae_ms_per_video"] = {k: round(v, 3) for k, v in per_video.items()}
    result["best"] = best
    save_json(args.out, result, done=True)
    print(f"{result['device']}, torch {result['torch']}, {result['dtype']}")
    print_ways(result["shapes"], WAYS, f"{'shape':<9} {'B':>3} {'C':>5} {'source':>8}",
               lambda r: f"{r['shape']:<9} {r['batch']:>3} {r['channels']:>5} {'x'.join(map(str, r['source'])):>8}", 18)
    print("UNet ms a step: " + ", ".join(f"{w} {v}" for w, v in result["unet_ms_per_step"].items()))
    print("VAE ms a video: " + ", ".join(f"{w} {v}" for w, v in result["vae_ms_per_video"].items()))
    print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
