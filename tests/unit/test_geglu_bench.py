"""bench/geglu_bench.py: its shapes are the full-size SVD-XT UNet's GEGLUs in a guided step at 1024x576 (counted
on meta tensors, nothing computed), and on the CPU (--tiny, Triton's interpreter standing in for the GPU) every
way runs and agrees with the exact computation. Its figures come from a GPU."""
from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import load_bench_script

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "geglu_bench.py"


def test_the_shapes_are_the_unets_geglus_in_a_guided_step():
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.activations import GEGLU

    bench = load_bench_script("geglu_bench")
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel().half()  # the class defaults are SVD-XT's UNet
    unet.to("meta")
    seen = collections.Counter()

    def hook(m, args, out):
        x = args[0]
        seen[x.numel() // x.shape[-1], m.proj.in_features, m.proj.out_features // 2] += 1

    for m in unet.modules():
        if isinstance(m, GEGLU):
            m.register_forward_hook(hook)
    with torch.device("meta"), torch.inference_mode():
        unet(torch.randn(2, 25, 8, 72, 128, dtype=torch.half), torch.tensor(1.0),
             torch.randn(2, 1, 1024, dtype=torch.half), added_time_ids=torch.randn(2, 3, dtype=torch.half))
    assert {s[:3]: s[3] for s in bench.SHAPES} == dict(seen)
    assert sum(calls * bench.flop(*s) for *s, calls in bench.SHAPES) / 1e12 == pytest.approx(34.54, abs=0.01)


def test_tiny_run_interpreted_times_every_way_and_agrees(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "g.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny", "--iters", "1", "--warmup", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    bench = load_bench_script("geglu_bench")
    assert result["complete"] and result["interpreted"] and len(result["shapes"]) == len(bench.TINY_SHAPES)
    for row in result["shapes"]:
        assert set(row["ways"]) == set(bench.WAYS)
        assert all(row["ways"][w]["ms"] > 0 for w in bench.WAYS), row
        for way in ("stock", "fused", "fused_compiled"):
            assert row["ways"][way]["max_abs_err"] < 1e-5, (row, way)  # float32: the same sums
    assert result["best"] in ("true", "false") and set(result["ms_per_step"]) == set(bench.WAYS)
    assert "best: " in proc.stdout


def test_best_is_fused_only_when_its_compiled_form_beats_stock_over_a_step():
    bench = load_bench_script("geglu_bench")

    def rows(*per_shape):
        return [{"calls_per_step": calls, "ways": {w: {"ms": ms} for w, ms in zip(bench.WAYS, times)}}
                for calls, times in per_shape]

    # stock, proj, fused, fused_compiled: per call, weighted by the calls a step
    per_step, best = bench.totals(rows((15, (1.0, 0.6, 0.7, 0.8)), (3, (0.1, 0.1, 0.5, 0.5))))
    assert best == "true" and per_step["fused_compiled"] == pytest.approx(13.5) and per_step["stock"] == 15.3
    assert bench.totals(rows((15, (1.0, 0.6, 0.7, 0.8)), (3, (0.1, 0.1, 0.5, 2.0))))[1] == "false"  # 18 > 15.3
    failed = rows((15, (1.0, 0.6, 0.7, math.nan)))  # fused_compiled failed (torch.compile refused the kernel)
    assert bench.totals(failed)[1] == "false"
