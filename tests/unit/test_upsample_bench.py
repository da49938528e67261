"""bench/upsample_bench.py on the CPU (--tiny): every way of computing an upsampler timed at each shape, the
same output as the stock way, and the way it tells the server to take. Its figures come from a GPU."""
from __future__ import annotations

import pytest

from ..helpers import load_bench_script, run_tiny_bench

pytest.importorskip("torch")


def _module():
    return load_bench_script("upsample_bench")


def test_the_shapes_are_svd_xts_upsamplers_at_1024x576():
    bench = _module()
    tflop = {m: sum(bench.flop(b, c, h, w) for _, mm, b, c, h, w in bench.SHAPES if mm == m) / 1e12
             for m in ("unet", "vae")}
    # torch's FLOP counter on the full-size models (twenty-first session): the UNet's three upsamplers are 7.64
    # of a guided step's 159.9 TFLOP, the decoder's three 12.52 of an 8-frame chunk's 55.5
    assert tflop["unet"] == pytest.approx(7.644, abs=0.001)
    assert tflop["vae"] == pytest.approx(12.524, abs=0.001)


def test_tiny_run_times_every_way_and_names_the_one_to_serve(tmp_path):
    bench = _module()
    result = run_tiny_bench(bench, tmp_path / "u.json")
    assert result["complete"] and len(result["shapes"]) == len(bench.TINY_SHAPES)
    for row in result["shapes"]:
        assert set(row["ways"]) == set(bench.WAYS)
        assert row["ways"]["stock"]["reference"]
        for way in ("transposed", "phases", "transposed_conv"):
            assert row["ways"][way]["max_abs_diff"] < 1e-5, (row["shape"], way)  # the same sums, float32
        assert "max_abs_diff" not in row["ways"]["phases_conv"]  # its phases are not yet interleaved
        assert all(row["ways"][w]["ms"] > 0 for w in bench.WAYS)
    assert result["best"] in ("false", "transposed", "phases")
    assert set(result["unet_ms_per_step"]) == set(bench.WAYS)


def test_best_is_the_fastest_convolution_over_a_video_or_none():
    bench = _module()

    def rows(unet: dict, vae: dict) -> list[dict]:
        return [{"model": "unet", "ways": {w: {"ms": ms} for w, ms in unet.items()}},
                {"model": "vae", "ways": {w: {"ms": ms} for w, ms in vae.items()}}]

    ms = dict.fromkeys(bench.WAYS, 1.0)
    # 25 steps of the UNet weigh more than one decode (3.125 chunks)
    step, video, best = bench.totals(rows(dict(ms, transposed_conv=0.5, phases_conv=0.9),
                                          dict(ms, transposed_conv=2.0, phases_conv=0.1)))
    assert best == "transposed" and step["transposed_conv"] == 0.5 and video["phases_conv"] == pytest.approx(0.3125)
    assert bench.totals(rows(dict(ms, stock=0.5), dict(ms, stock=0.5)))[2] == "false"  # stock fastest
    # a way that failed on a shape cannot be picked
    assert bench.totals(rows(dict(ms, transposed_conv=float("nan"), phases_conv=0.9), ms))[2] == "phases"
