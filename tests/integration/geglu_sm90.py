"""The fused GEGLU kernel compiled for a Hopper GPU (sm_90), here, without one: Triton's compiler and the ptxas it
ships need no device. The interpreter (geglu_interpreted.py) checks the arithmetic but not what only the code
generator refuses (a kernel reading a plain global, for one), nor what runs on the GPU.

Run by test_geglu.py in a process of its own (it installs a stand-in driver that names an sm_90 target).
Checks, raising AssertionError with the figures on a failure:
- every tile configuration the autotuner may pick compiles for sm_90, float16 with a bias, and the first in
  bfloat16 and without a bias; its PTX runs the Hopper tensor-core instruction (wgmma); ptxas assembles it
  for sm_90a with no register spills; its shared memory fits the H200's 227 KB a block;
- torch.compile's analysis of the kernel (which tensors it writes, so which the graph must keep apart)
  finds only the output: a kernel it could not analyse is taken to write its inputs, the weights among them.
Prints one JSON line of figures.

    python tests/integration/geglu_sm90.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

assert os.environ.get("TRITON_INTERPRET") != "1", "the compiler, not the interpreter"

from videogen_server.backends.svd import geglu_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_BYTES = 227 * 1024  # an H100's or H200's shared memory a block can take


class Hopper:
    """What Triton asks a driver while it compiles a kernel for a launch (and torch while it traces one): the
    target, a device, a stream. Nothing is launched."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_config(config: triton.Config, dtype, bias: bool):
    """The kernel as a launch at SVD-XT's largest GEGLU shape would compile it (`warmup`: Triton's own
    specialisation of the arguments, e.g. unit strides and 16-byte alignment, without the launch)."""
    import torch

    m, k, n = 460800, 320, 1280
    x, out = torch.empty(64, k, dtype=dtype), torch.empty(64, n, dtype=dtype)  # pointers: only dtype and alignment
    w, b = torch.empty(2 * n, k, dtype=dtype), torch.empty(2 * n, dtype=dtype)
    return geglu_kernel._geglu_linear.warmup(x, w, b, out, m, n, k, k, 1, k, 1, n, HAS_BIAS=bias, grid=(1,),
                                             num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)


def ptxas_report(ptx: str) -> str | None:
    """ptxas -v's report for sm_90a, from the first ptxas Triton ships that reads this PTX version (Triton's
    wheels carry an older `ptxas` and a newer `ptxas-blackwell`); None if none is there."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = [os.path.join(folder, n) for n in ("ptxas-blackwell", "ptxas")
             if os.access(os.path.join(folder, n), os.X_OK)]
    if not tools:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in tools:
            done = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                return done.stdout + done.stderr
            assert "Unsupported .version" in done.stderr, done.stderr[-2000:]
    finally:
        os.unlink(f.name)
    raise AssertionError(f"no ptxas here reads this PTX: {tools}")


def mutated_by_the_kernel() -> list[str]:
    """What torch.compile's analysis says the kernel writes, traced (not run) with a stand-in sm_90 driver."""
    import torch
    import torch.utils._triton as torch_triton
    from torch._higher_order_ops import triton_kernel_wrap

    torch_triton.has_triton = lambda: True  # torch takes user Triton kernels only where it finds a device
    seen = []
    analyse = triton_kernel_wrap.get_mutated_tensors

    def spy(*args, **kwargs):
        seen.append(sorted(analyse(*args, **kwargs)))
        return seen[-1]

    triton_kernel_wrap.get_mutated_tensors = spy
    x, w, b = torch.randn(40, 32), torch.randn(128, 32), torch.randn(128)
    try:
        torch.compile(lambda x, w, b: geglu_kernel.geglu_linear(x, w, b), fullgraph=True, backend="aot_eager")(x, w, b)
    except Exception:  # noqa: BLE001 - running it needs the GPU; the analysis ran while tracing
        pass
    assert seen, "torch.compile never analysed the kernel"
    return seen[0]


def main() -> None:
    import torch

    triton.runtime.driver.set_active(Hopper())
    figures: dict = {"triton": triton.__version__, "configs": []}
    cases = [(c, torch.float16, True) for c in geglu_kernel.CONFIGS]
    cases += [(geglu_kernel.CONFIGS[0], torch.bfloat16, True), (geglu_kernel.CONFIGS[0], torch.float16, False)]
    for config, dtype, bias in cases:
        kernel = compile_config(config, dtype, bias)
        ptx = kernel.asm["ptx"]
        row = {"config": config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
               "dtype": str(dtype).removeprefix("torch."), "bias": bias, "shared_bytes": kernel.metadata.shared,
               "wgmma": ptx.count("wgmma.mma_async")}
        report = ptxas_report(ptx)
        if report is not None:
            spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
            registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
            row.update(spill_bytes=sum(spills), registers=max(registers, default=0))
            assert row["spill_bytes"] == 0, row
        figures["configs"].append(row)
        assert row["wgmma"] > 0, f"no Hopper tensor-core instruction: {row}"
        assert row["shared_bytes"] <= SMEM_BYTES, row
    figures["mutated"] = mutated_by_the_kernel()
    assert figures["mutated"] == ["out_ptr"], figures["mutated"]
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
