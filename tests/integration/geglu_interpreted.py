"""The fused GEGLU kernel run by Triton's interpreter on the CPU (the GPU it is written for cannot run here).

Run by test_geglu.py in a process of its own: TRITON_INTERPRET=1 must be set before Triton is imported and
holds for the whole process. Checks, raising AssertionError with the figures on a failure:
- `geglu_kernel.geglu_linear` against the same computation in float64, for float32 and float16 inputs, with and
  without a bias, sizes that are not multiples of the tiles, strided inputs and weights, every tile
  configuration, one-element sizes: float32
  within its rounding, float16 no further from it than diffusers' own float16 GEGLU is;
- `accel.fused_geglu` on the tiny UNet: every GEGLU replaced, names and state dict kept, the UNet's
  output within float32 rounding of the stock one with the kernel called once per GEGLU; autograd,
  non-linear projections (FP8's) and explicit arguments go to diffusers' code; a fused model pickles.
Prints one JSON line of figures.

    TRITON_INTERPRET=1 python tests/integration/geglu_interpreted.py TINY_UNET_DIR
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
torch.set_num_threads(1)

from diffusers import UNetSpatioTemporalConditionModel  # noqa: E402
from diffusers.models.activations import GEGLU  # noqa: E402

from videogen_server.backends.svd import accel, geglu_kernel  # noqa: E402


def exact(x, w, b):
    h = F.linear(x.double(), w.double(), None if b is None else b.double())
    value, gate = h.chunk(2, -1)
    return value * F.gelu(gate)


def stock(x, w, b):  # diffusers' GEGLU, in the input's dtype
    value, gate = F.linear(x, w, b).chunk(2, -1)
    return value * F.gelu(gate)


def main(unet_dir: str) -> None:
    figures: dict = {"interpreted": geglu_kernel.INTERPRETED, "kernel": []}
    assert geglu_kernel.INTERPRETED
    g = torch.Generator().manual_seed(0)
    cases = [((3, 300), 40, 70, True), ((5,), 16, 8, False), ((2, 129), 64, 128, True), ((1,), 1, 1, True),
             ((130,), 72, 65, False)]
    # (float64 and bfloat16 are not checked: the interpreter's dot gets both wrong, a trivial kernel's too;
    # bench/geglu_bench.py compares bfloat16 on the GPU)
    for dtype in (torch.float32, torch.float16):
        for lead, k, n, bias in cases:
            x = torch.randn(*lead, k, generator=g).to(dtype)
            w = (torch.randn(2 * n, k, generator=g) / k ** 0.5).to(dtype)
            b = torch.randn(2 * n, generator=g).to(dtype) if bias else None
            ref = exact(x, w, b)
            got = geglu_kernel.geglu_linear(x, w, b)
            assert got.shape == (*lead, n) and got.dtype == dtype, (got.shape, got.dtype)
            err = float((got.double() - ref).abs().max())
            stock_err = float((stock(x, w, b).double() - ref).abs().max())
            scale = float(ref.abs().max()) or 1.0
            figures["kernel"].append({"dtype": str(dtype), "shape": [*lead, k, n], "bias": bias, "max_abs_err": err,
                                      "stock_max_abs_err": stock_err, "max_abs": scale})
            if dtype == torch.float32:
                assert err <= 1e-5 * scale, figures["kernel"][-1]
            else:  # one rounding to float16 (the stock form rounds twice): within stock's error, or an ulp
                assert err <= max(stock_err, 2 ** -10 * scale), figures["kernel"][-1]
    # strided inputs whose 2-d view keeps its strides (a row stride of 2 K; a column stride of 2), as a caller
    # may hand them; the weights strided too
    w, b = (torch.randn(2 * 24, 64, generator=g) / 32 ** 0.5)[:, ::2], torch.randn(2 * 24, generator=g)
    assert w.stride() == (64, 2)
    for x in (torch.randn(5, 40, 64, generator=g)[..., :32], torch.randn(200, 64, generator=g)[:, ::2]):
        assert not x.is_contiguous() and x.reshape(-1, 32).stride() != (32, 1)
        torch.testing.assert_close(geglu_kernel.geglu_linear(x, w, b).double(), exact(x, w, b), rtol=0, atol=1e-5)
    # every tile shape the GPU's autotuner may pick, over row tiles that end a GROUP_M group part-way
    x = torch.randn(1300, 24, generator=g)
    w, b = torch.randn(2 * 136, 24, generator=g) / 24 ** 0.5, torch.randn(2 * 136, generator=g)
    for config in geglu_kernel.CONFIGS:
        torch.testing.assert_close(geglu_kernel.geglu_linear(x, w, b, config=config).double(), exact(x, w, b),
                                   rtol=0, atol=1e-5, msg=lambda m: f"{config}: {m}")
    figures["configs_checked"] = len(geglu_kernel.CONFIGS)

    # the tiny UNet with its GEGLUs fused; the interpreter stands in for the GPU
    base = UNetSpatioTemporalConditionModel.from_pretrained(unet_dir).eval()
    unet = copy.deepcopy(base)
    geglus = sum(type(m) is GEGLU for m in base.modules())
    assert accel.fused_geglu(unet) == geglus > 0 and accel.fused_geglu(unet) == 0
    assert not any(type(m) is GEGLU for m in unet.modules())
    assert {k: (v.shape, v.dtype) for k, v in unet.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in base.state_dict().items()}
    calls = []
    kernel = accel._geglu_linear
    accel._geglu_linear = lambda *a: calls.append(a[0].shape) or kernel(*a)
    frames = 3
    inputs = dict(sample=torch.randn(2, frames, 8, 6, 8, generator=g), timestep=torch.tensor(1.0),
                  encoder_hidden_states=torch.randn(2, 1, base.config.cross_attention_dim, generator=g),
                  added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2))
    with torch.inference_mode():
        ref = base(**inputs, return_dict=False)[0]
        assert unet(**inputs, return_dict=False)[0].equal(ref), "on the CPU (not a GPU): diffusers' code"
        assert calls == []
        accel.GEGLU_DEVICES = ("cuda", "cpu")  # the interpreter runs CPU tensors: as if on the GPU
        out = unet(**inputs, return_dict=False)[0]
    assert len(calls) == geglus, (len(calls), geglus)
    diff = float((out - ref).abs().max())
    figures["unet_max_abs_diff"], figures["unet_max_abs"] = diff, float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    calls.clear()
    module = next(m for m in unet.modules() if hasattr(m, "proj") and type(m).__name__ == "FusedGEGLU")
    h = torch.randn(2, 7, module.proj.in_features, generator=g)
    with torch.enable_grad():  # training: diffusers' code, which autograd can differentiate
        h.requires_grad_(True)
        module(h).sum().backward()
        assert h.grad is not None and calls == []
    with torch.inference_mode():
        module(h.detach())
        assert len(calls) == 1
        module(h.detach(), scale=None)  # an explicit argument: diffusers' code, which knows it
        assert len(calls) == 1

    class Fp8Like(torch.nn.Linear):  # accel.to_fp8's layers are not plain linears
        pass

    other = GEGLU(8, 4)
    other.proj = Fp8Like(8, 8)
    holder = torch.nn.Sequential(other)
    assert accel.fused_geglu(holder) == 0 and type(holder[0]) is GEGLU

    again = pickle.loads(pickle.dumps(unet))
    assert sum(type(m).__name__ == "FusedGEGLU" for m in again.modules()) == geglus
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1])
