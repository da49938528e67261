"""bench/conv_bench.py: its shapes are the full-size SVD-XT decoder's convolutions of one 8-frame chunk at
1024x576 (counted on meta tensors, nothing computed), and on the CPU (--tiny) every way runs and agrees.
Its figures come from a GPU."""
from __future__ import annotations

import collections
import json
import math

import pytest

from ..helpers import load_bench_script, run_tiny_bench

torch = pytest.importorskip("torch")


def _module():
    return load_bench_script("conv_bench")


@pytest.mark.parametrize("frames", [8, 1])
def test_the_shapes_are_the_decoders_convolutions_of_a_chunk(frames):
    from diffusers import AutoencoderKLTemporalDecoder

    from videogen_server.backends.svd import accel

    bench = _module()
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
                                           down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4,
                                           layers_per_block=2).half()
    vae.to("meta")  # (a few buffers are made on the CPU whatever the device)
    accel.temporal_convs_2d(vae.decoder)  # as the server runs it
    seen = collections.Counter()

    def hook(m, args, out):
        x = args[0]
        if isinstance(m, accel.FramesConv2d):  # [1, C, F, H, W]
            kind = "temporal" if frames > 1 else "temporal1"
            seen[kind, x.shape[1], m.out_channels, m.kernel_size[0], x.shape[3], x.shape[4]] += 1
            assert x.shape[2] == frames == bench.frames_of(kind)
        elif frames > 1:  # [F, C, H, W]
            assert m.kernel_size[0] == m.kernel_size[1] and x.shape[0] == bench.CHUNK
            seen["spatial", x.shape[1], m.out_channels, m.kernel_size[0], x.shape[2], x.shape[3]] += 1

    for m in vae.decoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        vae.decode(torch.randn(frames, 4, 72, 128, dtype=torch.half), num_frames=frames)
    shapes = bench.SHAPES if frames > 1 else bench.ONE_FRAME_SHAPES
    assert {s[1:]: s[0] for s in shapes} == dict(seen)
    if frames > 1:
        assert sum(s[0] * bench.flop(*s[1:]) for s in shapes) / 1e12 == pytest.approx(54.0, abs=0.01)


def test_tiny_run_times_every_way_and_sums_the_chunk_per_configuration(tmp_path):
    bench = _module()
    result = run_tiny_bench(bench, tmp_path / "c.json")
    assert result["complete"] and len(result["shapes"]) == len(bench.TINY_SHAPES)
    # cuDNN's timed kernels in a process of their own (its plan cache would hand them the heuristic's)
    assert result["benchmark_process"]["returncode"] == 0 and result["benchmark_process"]["complete"]
    assert json.loads((tmp_path / "c.json.benchmark.json").read_text())["complete"]
    for row in result["shapes"]:
        assert set(row["ways"]) == set(bench.WAYS[row["kind"]])
        for benchmark in (False, True):  # each process's first way is its reference
            first, *rest = [e for w, e in row["ways"].items() if w.endswith("_benchmark") == benchmark]
            assert first["reference"] and all(e["max_abs_diff"] < 1e-5 for e in rest)  # the same convolution
        assert all(e["ms"] > 0 for e in row["ways"].values())
    for key in ("chunk_ms", "one_frame_temporal_ms", "video_ms"):
        ms = result[key]
        assert set(ms) == {*bench.CONFIGS, "best"} and all(v > 0 for v in ms.values())
        assert ms["best"] <= min(ms[c] for c in bench.CONFIGS)
    one = next(r for r in result["shapes"] if r["kind"] == "temporal1")
    assert one["frames"] == 1 and one["ways"]["middle_tap"]["max_abs_diff"] < 1e-5  # the same convolution


def test_configurations_sum_each_shapes_way_times_its_count():
    bench = _module()
    rows = [{"count": 2, "kind": "spatial", "ways": {"conv2d": {"ms": 1.0}, "conv2d_benchmark": {"ms": 0.5}}},
            {"count": 3, "kind": "temporal", "ways": {"frames2d": {"ms": 4.0}, "frames2d_benchmark": {"ms": 2.0},
                                                       "conv3d": {"ms": 1.0}, "conv3d_benchmark": {"error": "x"}}},
            {"count": 3, "kind": "temporal1", "ways": {"frames2d": {"ms": 3.0}, "frames2d_benchmark": {"ms": 3.0},
                                                        "conv3d": {"ms": 2.0}, "conv3d_benchmark": {"ms": 2.0},
                                                        "middle_tap": {"ms": 0.25}}}]
    t = bench.totals(rows)
    chunk, one, video = t["chunk_ms"], t["one_frame_temporal_ms"], t["video_ms"]
    assert chunk["heuristic"] == 2 * 1.0 + 3 * 4.0 and chunk["benchmark"] == 2 * 0.5 + 3 * 2.0
    assert chunk["conv3d"] == 2 * 1.0 + 3 * 1.0 and math.isnan(chunk["conv3d_benchmark"])  # a way that failed
    assert chunk["best"] == 2 * 0.5 + 3 * 1.0
    # the one-frame chunk: the server's middle tap, against what it ran before (frames2d)
    assert one["heuristic"] == one["benchmark"] == 3 * 0.25 and one["heuristic_before"] == 3 * 3.0
    assert video["heuristic"] == 3 * chunk["heuristic"] + one["heuristic"]
    assert video["heuristic_before"] == 3 * chunk["heuristic"] + 3 * 3.0
