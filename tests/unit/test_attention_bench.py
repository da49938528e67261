"""bench/attention_bench.py on the CPU (--tiny): every shape of a step timed for each kernel asked for, a
kernel that cannot run recorded as such, the per-step sum of the rest. Its figures come from a GPU."""
from __future__ import annotations

import pytest

from ..helpers import load_bench_script, run_tiny_bench

pytest.importorskip("torch")


def _module():
    return load_bench_script("attention_bench")


def test_the_step_shapes_add_up_to_the_step_arithmetic():
    bench = _module()
    flop = {}
    for name, batch, tokens, heads, calls in bench.shapes():
        flop[name] = calls * bench.flop(batch, tokens, heads) / 1e12  # the figure its TFLOP/s divide
    # docs/performance.md (sixth session): spatial self-attention 27.2 TFLOP at 9216 tokens, 3.4 at 2304,
    # 0.4 at 576; temporal 0.13 in all
    assert flop["spatial L1"] == pytest.approx(27.2, abs=0.05)
    assert flop["spatial L2"] == pytest.approx(3.4, abs=0.05)
    assert flop["spatial L3"] == pytest.approx(0.42, abs=0.01)
    assert sum(v for k, v in flop.items() if k.startswith("temporal")) == pytest.approx(0.13, abs=0.01)


def test_tiny_run_times_each_kernel_and_records_one_that_cannot_run(tmp_path):
    bench = _module()
    out = tmp_path / "a.json"
    result = run_tiny_bench(bench, out, "--kernels", "math,flash,efficient")
    assert len(result["shapes"]) == 8
    for row in result["shapes"]:
        assert row["kernels"]["math"]["reference"] and row["kernels"]["math"]["ms"] > 0
        assert row["kernels"]["flash"]["max_abs_diff"] < 1e-5  # the same attention, float32
        assert "error" in row["kernels"]["efficient"]  # no CPU kernel: a result, not a crash
    assert result["per_step_s"]["math"] > 0 and result["per_step_s"]["efficient"] is None
    assert result["complete"]
    assert bench.main(["--out", str(out), "--tiny", "--kernels", "cudnn,nope"]) == 2  # named, not a KeyError
