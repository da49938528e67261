"""GEGLU fused into its projection: one Triton kernel computes value * gelu(gate) from x and the projection's
weights, so the projection's output (twice as wide as the result) is never written to memory and read back.

diffusers' GEGLU is `proj = Linear(dim, 2 * inner)`, `value, gate = proj(x).chunk(2, -1)`,
`value * gelu(gate)` (exact GELU, erf). Here each program computes one [BLOCK_M, BLOCK_N] tile of the
result from two accumulators over the same rows of x: rows n of the weight (the value half) and rows
inner + n (the gate half), then adds the biases, applies the GELU and multiplies in float32, and rounds
once to the output's dtype (the stock form rounds the projection's output to 16 bit first: the results
differ by that rounding).

Imported only when a model asks for `fused_geglu` (it imports Triton, which a CPU install does not
have). With TRITON_INTERPRET=1 set before its import, Triton's interpreter runs the kernel on CPU
tensors (how the tests check its arithmetic here); `CONFIGS` are then not timed, the first is used.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: Tile shapes tried on a GPU (timed at the first call of each (M, N, K), the fastest kept; see _KERNEL). Two
#: accumulators per program: BLOCK_N 128 holds as many as a 128x256 single GEMM's. All compile for sm_90
#: with wgmma and without register spills (tests/integration/geglu_sm90.py).
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
#: a constexpr: a kernel that reads a plain global fails to compile (Triton >= 3.0), which the interpreter
#: does not check (tests/integration/geglu_sm90.py compiles the kernel for a Hopper target instead)
_SQRT_HALF = tl.constexpr(0.7071067811865476)


@triton.jit
def _geglu_linear(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    # program -> tile, GROUP_M row tiles at a time along the columns (the weights' tiles stay in L2)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: M x K passes 2^31 at large sizes
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    value_w = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    gate_w = value_w + N * stride_wn
    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_tile, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & (cols[None, :] < N)
        value = tl.dot(a, tl.load(value_w, mask=w_ok, other=0.0), value)
        gate = tl.dot(a, tl.load(gate_w, mask=w_ok, other=0.0), gate)
        x_tile += BLOCK_K * stride_xk
        value_w += BLOCK_K * stride_wk
        gate_w += BLOCK_K * stride_wk
    if HAS_BIAS:
        value += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    result = value * (0.5 * gate * (1.0 + tl.math.erf(gate * _SQRT_HALF)))
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


#: tuned per (M, N, K): the same layer width at another token count (SVD-XT's mid block, another size) is
#: timed on its own. Under torch.compile Inductor runs these configurations through its own tuning.
_KERNEL = _geglu_linear if INTERPRETED else triton.autotune(configs=CONFIGS, key=["M", "N", "K"])(_geglu_linear)
#: Triton's autotuner keeps a call's state on itself while it times: eager calls from several instance
#: threads take turns (a launch only queues work: microseconds); compiled calls go through Inductor
_LAUNCH_LOCK = threading.Lock()


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: triton.Config | None = None) -> torch.Tensor:
    """value * gelu(gate) for (value, gate) = linear(x, weight, bias).chunk(2, -1), in one kernel.

    x [..., K], weight [2 N, K] (an nn.Linear's), bias [2 N] or None -> [..., N] in x's dtype. The caller
    checks devices and dtypes (`accel.fused_geglu`'s module does); no autograd. `config`: one of CONFIGS
    instead of the tuned choice (the interpreter, which tunes nothing, runs CONFIGS[0] otherwise)."""
    k = x.shape[-1]
    n = weight.shape[0] // 2
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    args = (x2, weight, weight if bias is None else bias, out, m, n, k, x2.stride(0), x2.stride(1),
            weight.stride(0), weight.stride(1), out.stride(0))
    if config is not None or INTERPRETED:
        config = config or CONFIGS[0]
        meta = dict(config.kwargs)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        if not INTERPRETED:
            meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
        _geglu_linear[grid](*args, HAS_BIAS=bias is not None, **meta)
        return out.view(*x.shape[:-1], n)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if torch.compiler.is_compiling():  # captured whole (a lock would break the graph)
        _KERNEL[grid](*args, HAS_BIAS=bias is not None)
    else:
        with _LAUNCH_LOCK:
            _KERNEL[grid](*args, HAS_BIAS=bias is not None)
    return out.view(*x.shape[:-1], n)
