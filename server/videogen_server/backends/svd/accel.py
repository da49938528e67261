"""Speed and memory options of the SVD backend, each one a small, separately measurable step.

- `Fp8Linear` / `to_fp8`: the UNet's linear layers as FP8 (e4m3) matrix products with per-row dynamic
  activation scales and per-output-channel weight scales (the torchao "float8 dynamic, row-wise" recipe,
  written on `torch._scaled_mm` so it needs no extra package), or with static per-layer activation
  scales calibrated once (`fp8_calibration`), so that quantising an activation is a scale and a cast the
  compiler fuses into the kernel producing it. Convolutions stay in 16 bit.
- `fuse_qkv`: one projection for query/key/value (self-attention) and key/value (cross-attention).
- `channels_last`: 2-d convolution weights in NHWC.
- `temporal_convs_2d`: the temporal (k x 1 x 1) 3-d convolutions as the same (k x 1) 2-d convolutions
  over frames x pixels, which Inductor's channels-last layout covers (it leaves 3-d ones to cuDNN's
  layout transposes).
- `fold_cross_attention`: attention over SVD's single image-embedding token is its value projection;
  the query projection and the softmax are skipped.
- `fold_upsample`: a nearest-2x upsampling and the 3x3 convolution after it as one convolution of the
  source (stride-2 transposed, or four output phases), with the taps that read repeated pixels summed.
- `flash_attention_4`: the self-attentions through FlashAttention-4's kernels (the flash-attn-4 package;
  Hopper and Blackwell), as a custom op torch.compile keeps whole; per model, not process-wide.
- `prefer_sdpa_backend`: makes scaled-dot-product attention prefer one backend (flash, cuDNN, efficient,
  math), process-wide while a model that asked for it is loaded; `use_cudnn_benchmark` likewise for
  cuDNN's convolution autotuning.
- `compile_module` / `CompiledDecoder`: torch.compile with optional Inductor options; the VAE decoder with
  a dynamic frame dimension, so chunk lengths share graphs (the decoder is temporal: padding a chunk
  would change its frames). `GraphCounter` counts the graphs each instance built; `use_compile_cache`
  points the on-disk caches at a persistent folder; `load_compile_artifacts` / `save_compile_artifacts`
  move what was compiled between machines as one file per torch build and device (torch's Mega-Cache).
- `PhaseOffload`: the low-memory mode; whole models move to the device for their phase only, copied
  from pinned host memory (the host copy stays the master, so moving a model off costs nothing).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import types
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
#: Linear layers left in 16 bit: time/conditioning embeddings see a handful of rows, where FP8 gains nothing
#: and the scale round-trip costs precision.
FP8_SKIP = ("time_embedding", "add_embedding", "time_emb_proj", "time_pos_embed")
#: Static FP8: an activation's scale covers this many times the largest magnitude calibration met, so a
#: request whose activations run larger than the calibrating one's is not clipped at once. e4m3 is a float
#: format: the headroom costs precision only for values ~2^-14 of the largest, which fall to subnormals.
FP8_STATIC_HEADROOM = 2.0

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
except ImportError:  # pragma: no cover - torch < 2.3
    SDPA_BACKENDS = {"auto": None}


_sdpa_lock = threading.Lock()
_sdpa_preference: str | None = None  # the process's non-auto choice, once one model made it
_sdpa_users = 0  # instances holding it; the last one to release it restores torch's default
_sdpa_stack = contextlib.ExitStack()  # holds that choice while it has users


def prefer_sdpa_backend(name: str) -> str:
    """Makes SDPA prefer one backend for the whole process; returns the preference in force.

    torch's SDPA switches are process-wide, not per thread: a per-call context in one instance
    thread would change every other instance's kernels while it ran (and two overlapping contexts
    could leave the wrong one behind for good), and compiled graphs pick their kernel when traced.
    So the first model that asks for a kernel sets it, before anything is compiled; "auto" models
    share it, and a model asking for another kernel is refused until every instance that asked for
    the first has called `release_sdpa_backend` (unloaded). The other backends stay enabled, in
    torch's own order, for calls the preferred one cannot take: cuDNN refuses SVD's cross-attention
    (its key/value sequence is one token long), and pinning it alone failed the whole forward on an
    H200 ("No available kernel").
    """
    global _sdpa_preference, _sdpa_users
    backend = SDPA_BACKENDS[name]
    with _sdpa_lock:
        if backend is None:
            return _sdpa_preference or "auto"
        if _sdpa_preference == name:
            _sdpa_users += 1
            return name
        if _sdpa_preference is not None:
            raise ValueError(f"attention_backend: {name!r}, but this process already prefers "
                             f"{_sdpa_preference!r} for another model (the setting is process-wide)")
        try:
            torch_order = [SDPBackend(b) for b in torch._C._get_sdp_priority_order()]
        except (AttributeError, ValueError):  # no priority API: a fixed order
            torch_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                           SDPBackend.CUDNN_ATTENTION]
        _sdpa_stack.enter_context(sdpa_kernel([backend] + [b for b in torch_order if b != backend],
                                              set_priority=True))
        _sdpa_preference, _sdpa_users = name, 1
        return name


def release_sdpa_backend(name: str) -> None:
    """One holder of `name` is gone; the last one restores torch's own kernel choice."""
    global _sdpa_preference, _sdpa_users
    with _sdpa_lock:
        if SDPA_BACKENDS[name] is None or _sdpa_preference != name:
            return
        _sdpa_users -= 1
        if _sdpa_users == 0:
            _sdpa_stack.close()
            _sdpa_preference = None


_cudnn_lock = threading.Lock()
_cudnn_users = 0  # instances that asked for cuDNN autotuning; the last one to go restores the setting
_cudnn_before: bool | None = None


def use_cudnn_benchmark() -> None:
    """cuDNN autotuning (`torch.backends.cudnn.benchmark`): the first convolution of each shape times
    cuDNN's algorithms and keeps the fastest, instead of its heuristic's pick. Pays where shapes are
    few and fixed, as in compiled shape buckets (the warm-up requests pay the timing). Process-wide,
    as torch's switch is: on while any instance that asked for it is loaded."""
    global _cudnn_users, _cudnn_before
    with _cudnn_lock:
        if _cudnn_users == 0:
            _cudnn_before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        _cudnn_users += 1


def release_cudnn_benchmark() -> None:
    global _cudnn_users
    with _cudnn_lock:
        if _cudnn_users == 0:
            return
        _cudnn_users -= 1
        if _cudnn_users == 0:
            torch.backends.cudnn.benchmark = bool(_cudnn_before)


# -- FP8 -------------------------------------------------------------------------------------------

def fp8_supported(device: torch.device) -> str | None:
    """None if FP8 matrix products run on `device`, else why not."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU has {major}.{minor}"
    # The capability is not enough: row-wise scaled products are missing from some builds on some GPUs
    # (cuBLAS answers NOT_SUPPORTED on sm_120 in torch 2.10, pytorch#192707). One 16x16 product says so at
    # load, by name, instead of failing the first request. No nn.Linear is built for it: while another
    # thread's from_pretrained instantiates its model, accelerate's empty-weights init sends every new
    # parameter in the process to the meta device (a probe built so failed in CI).
    weight = types.SimpleNamespace(in_features=16, out_features=16, bias=None,
                                   weight=torch.ones(16, 16, dtype=torch.float32, device=device))
    try:
        Fp8Linear(weight)(torch.ones(16, 16, dtype=torch.float32, device=device))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - whatever the product raises, FP8 is not for this device
        return f"an FP8 row-wise matrix product fails on {device} ({type(exc).__name__}: {str(exc)[:200]})"
    return None


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W in float8 e4m3: W scaled per output channel once; x per row at run time
    (dynamic), or by one scale per layer fixed by calibration (`static`).

    The product runs on FP8 tensor cores (`torch._scaled_mm`, bfloat16 out, the output type every
    backend supports for row-wise scales) and is cast back to the activation dtype; under torch.compile
    the scaling and casts fuse into the neighbouring kernels. Dynamic scaling needs the largest magnitude
    of each row before the cast: a reduction over the activation before the product (on an H200 it cost
    more than FP8 saved, docs/performance.md run 4). A static scale is known before the activation is:
    its cast fuses into the kernel that produces it. Until calibrated (`fp8_calibration`), a static layer
    scales dynamically.
    """

    def __init__(self, linear: nn.Linear, static: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [N, 1]
        self.register_buffer("weight_fp8", (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, N] float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.static = static
        # Python flags (read when the module is traced, not at each call): recording input_amax; and
        # input_scale set by a calibration
        self.calibrating = False
        self.calibrated = False
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32, device=w.device))  # largest |x| seen
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=w.device))

    @staticmethod
    def eligible(linear: nn.Linear) -> bool:
        # _scaled_mm wants both matrix sizes divisible by 16
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()  # _scaled_mm on CUDA wants a row-major left side
        xf = x2.float()
        if self.calibrated and not self.calibrating:
            # one scale for the layer, known in advance: x / scale and the cast are elementwise (row-wise
            # _scaled_mm wants an [M, 1] scale, so the scalar is expanded: M floats)
            x_scale = self.input_scale.expand(x2.shape[0], 1).contiguous()
            xq = (xf / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            if self.calibrating:
                self.input_amax.copy_(torch.maximum(self.input_amax, xf.abs().amax()))
            x_scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [M, 1]
            xq = (xf / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (", static" if self.static else ""))


def to_fp8(model: nn.Module, skip: tuple[str, ...] = FP8_SKIP, *, static: bool = False) -> int:
    """Replaces the eligible nn.Linear layers of `model` in place; returns how many. `static`: with
    activation scales to calibrate (`fp8_calibration`) before the model is compiled."""
    return _replace_modules(model, lambda name, m: isinstance(m, nn.Linear) and Fp8Linear.eligible(m)
                            and not any(s in name for s in skip), lambda m: Fp8Linear(m, static=static))


@contextlib.contextmanager
def fp8_calibration(model: nn.Module, headroom: float = FP8_STATIC_HEADROOM):
    """Calibrates the static FP8 layers of `model` on the forward passes run inside (eager: the amax
    bookkeeping is not meant to be compiled): each layer's scale becomes `headroom` times the largest
    magnitude its input reached, over FP8's largest value. Layers calibrated before start over. A layer
    that saw no input keeps scaling dynamically (one the model no longer calls, such as the projections
    `fold_cross_attention` bypasses); raises if none saw any (nothing ran), leaving the model uncalibrated.
    Yields the static layers."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear) and m.static]
    for m in layers:
        m.input_amax.zero_()
        m.calibrating, m.calibrated = True, False
    try:
        yield layers
    finally:
        for m in layers:
            m.calibrating = False
    reached = [m for m in layers if bool(m.input_amax > 0)]
    if layers and not reached:
        raise RuntimeError(f"fp8 calibration: none of the {len(layers)} static FP8 layers saw an input")
    for m in reached:
        m.input_scale.copy_(m.input_amax * headroom / FP8_MAX)
        m.calibrated = True


def _replace_modules(model: nn.Module, wanted, make) -> int:
    """Replaces each submodule for which wanted(name, module) holds by make(module); returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if name and wanted(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(module))
    return len(targets)


# -- group norms from per-channel statistics ----------------------------------------------------------

class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed from per-channel statistics: the mean and variance of each channel over its
    pixels (and frames), combined per group (the group's mean is the mean of its channels' means; its
    variance the mean of their variances plus that of their means, the channels holding equal counts),
    then (x - mean) * (rstd * weight) + bias, elementwise. The same maths; float32 statistics as torch's
    kernel keeps them, so only rounding differs.

    Why: under torch.compile the convolutions around a group norm run channels-last (NHWC), and
    Inductor's group-norm reduction walks a group's elements (a few channels of every pixel) at the
    channel count's stride, reading a fraction of each memory sector it loads: the VAE decoder's group
    norms took ~5 ms a call on an H200 (run 7) where reading their tensor twice and writing it once
    takes ~0.8 ms. A reduction over the pixels for every channel reads along the contiguous channels
    instead, as a channels-last batch norm does. Inputs of fewer than 3 dimensions (no pixels) go to
    nn.GroupNorm's own code.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            return super().forward(x)
        n, c = x.shape[:2]
        g, per = self.num_groups, c // self.num_groups
        xf = x.float()
        var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)  # [N, C]
        mean_c, var_c = mean_c.view(n, g, per), var_c.view(n, g, per)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = (var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var_g + self.eps)
        mean = mean_g.expand(n, g, per).reshape(n, c)
        scale = rstd.expand(n, g, per).reshape(n, c)
        shift = None
        if self.affine:
            scale = scale * self.weight.float()
            shift = self.bias.float()
        shape = (n, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * scale.view(shape)
        if shift is not None:
            y = y + shift.view(1, c, *([1] * (x.dim() - 2)))
        return y.to(x.dtype)


def split_group_norm(model: nn.Module) -> int:
    """Every nn.GroupNorm of `model` (exactly that class) as `SplitGroupNorm`, same parameters and names;
    returns how many."""
    def make(m: nn.GroupNorm) -> SplitGroupNorm:
        new = SplitGroupNorm.__new__(SplitGroupNorm)
        new.__dict__ = m.__dict__.copy()  # parameters, buffers, hooks: the module's own, not copies
        return new

    return _replace_modules(model, lambda _, m: type(m) is nn.GroupNorm, make)


# -- memory format -----------------------------------------------------------------------------------

def channels_last(model: nn.Module) -> int:
    """Convolution weights in channels-last order: NHWC for the 2-d convolutions, NDHWC for the temporal
    3-d ones, which cuDNN's tensor-core kernels read without a transpose. Activations follow the
    weights' format out of each convolution, and the temporal blocks' (B, F, C, H, W) -> (B, C, F, H, W)
    permute of an NHWC activation is already NDHWC, so no layout transposes remain around convolutions
    (cuDNN's NCHW<->NHWC transposes were 0.031 s of a compiled step on an H200)."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
            n += 1
        elif isinstance(m, nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
            n += 1
    return n


class FramesConv2d(nn.Conv2d):
    """A (k, 1, 1) Conv3d over [B, C, F, H, W] as the (k, 1) Conv2d over [B, C, F, H*W]: the same sums.

    The temporal blocks permute a [B*F, C, H, W] activation to [B, C, F, H, W]; flattening H and W of
    that view costs nothing, and when the activation is channels-last the result is a channels-last
    4-d tensor as it stands. Inductor's layout optimisation keeps 2-d convolutions channels-last end to
    end but leaves 3-d ones in the input's order, so cuDNN transposed around each of the UNet's 44
    temporal convolutions (part of 0.031 s of layout transposes per compiled SVD-XT step, H200).

    Its state dict is the Conv3d's ([O, I, k, 1, 1] weights), and it loads either form, so checkpoints
    saved from a model with these convolutions load into the stock model and back.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(FramesConv2d._weight_as_3d)
        self.register_load_state_dict_pre_hook(FramesConv2d._weight_from_3d)

    @staticmethod
    def _weight_as_3d(module, state_dict, prefix, local_metadata) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].unsqueeze(-1)

    @staticmethod
    def _weight_from_3d(module, state_dict, prefix, local_metadata, *args) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 5 and state_dict[key].shape[-1] == 1:
            state_dict[key] = state_dict[key].squeeze(-1)

    @classmethod
    def eligible(cls, conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv3d and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
                and conv.dilation == (1, 1, 1) and isinstance(conv.padding, tuple) and conv.padding[1:] == (0, 0)
                and conv.padding_mode == "zeros" and not conv.transposed)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d) -> "FramesConv2d":
        w = conv.weight.detach()
        new = cls(conv.in_channels, conv.out_channels, (conv.kernel_size[0], 1), padding=(conv.padding[0], 0),
                  groups=conv.groups, bias=conv.bias is not None, device="meta")
        new.weight = nn.Parameter(w.squeeze(-1).contiguous(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # unbatched [C, F, H, W], as Conv3d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 5:
            raise ValueError(f"FramesConv2d takes [B, C, F, H, W] or [C, F, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        k, pad = self.kernel_size[0], self.padding[0]
        if x.shape[2] == 1 and k % 2 == 1 and pad == k // 2:
            # One frame: every tap but the middle one reads the zero padding, so the convolution is the
            # middle tap's 1x1 convolution (a plain GEMM), the same sums. Why: 25 frames in chunks of 8 end
            # with a one-frame chunk, whose 29 temporal convolutions in SVD-XT's decoder are a kernel
            # height of 3 over an input height of 1, an odd shape for cuDNN; run 7's decode ran 31 calls of
            # a generic sm80 kernel (`indexed_wo_smem`, 3.7 ms each) that may be these (not yet confirmed:
            # bench/conv_bench.py times them).
            out = torch.nn.functional.conv2d(x.flatten(3), self.weight[:, :, pad:pad + 1], self.bias,
                                             groups=self.groups)
        else:
            out = super().forward(x.flatten(3))
        return out.unflatten(3, (h, w))


def temporal_convs_2d(model: nn.Module) -> int:
    """Replaces every eligible temporal Conv3d of `model` by a `FramesConv2d`; returns how many.

    Parameter names stay; the weights lose their trailing unit dimension ([O, I, k, 1, 1] ->
    [O, I, k, 1]) in memory but keep it in state dicts (see `FramesConv2d`)."""
    return _replace_modules(model, lambda name, m: FramesConv2d.eligible(m), FramesConv2d.from_conv3d)


# -- nearest 2x upsampling folded into the convolution after it ----------------------------------------

#: how `fold_upsample` computes an Upsample2D's nearest 2x upsampling and 3x3 convolution
UPSAMPLE_FOLDS = ("transposed", "phases")
#: phase a of an output row (row 2i + a) reads source rows (i - 1, i) when a = 0 and (i, i + 1) when a = 1,
#: with the 4-tap kernel's taps at these indices (see `upsample_taps`)
_PHASE_TAPS = ((3, 1), (2, 0))


def upsample_taps(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, 3, 3] weights of a 3x3 convolution (padding 1) over a nearest-2x-upsampled input -> the
    [O, I, 4, 4] taps of the same map as a stride-2 transposed convolution (padding 1) of the source.

    Along each dimension, output 2i reads upsampled positions 2i - 1, 2i, 2i + 1, that is source i - 1
    (weight w0) and i twice (w1 + w2); output 2i + 1 reads i twice (w0 + w1) and i + 1 (w2). A transposed
    convolution gives output o the source i with tap o + 1 - 2i: taps [w2, w1 + w2, w0 + w1, w0]. The
    sums are taken in float32 (float64 for float64 weights) and rounded once to the weights' dtype.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = t.unbind(dim)
        return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)

    return along(along(w, 2), 3).to(weight.dtype)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, 3, 3] -> [4 O, I, 2, 2]: `upsample_taps` split by output phase (row parity, then column parity),
    each phase's 2x2 taps over the source rows and columns it reads, in order."""
    taps = upsample_taps(weight)
    return torch.cat([taps[:, :, rows][:, :, :, cols] for rows in _PHASE_TAPS for cols in _PHASE_TAPS])


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, how: str) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), computed without the
    upsampled tensor and with 16 of the 36 multiply-adds per source pixel: the same sums, each weight
    applied to a repeated source pixel added to the others first (float rounding differs).

    `how`: "transposed", one stride-2 transposed convolution with `upsample_taps`; "phases", the four
    output phases (row and column parity) as one 2x2 convolution with 4x the output channels over the
    source padded by one (an (H + 1) x (W + 1) grid: 18 % more than 16/36 at 9x16, ~2 % at 72x128),
    interleaved afterwards (an elementwise gather torch.compile fuses into what reads it).
    """
    if how == "transposed":
        return torch.nn.functional.conv_transpose2d(x, upsample_taps(weight).transpose(0, 1), bias, stride=2,
                                                    padding=1)
    if how != "phases":
        raise ValueError(f"fold_upsample: {how!r} is not one of {list(UPSAMPLE_FOLDS)}")
    n, _, h, w = x.shape
    out = weight.shape[0]
    y = torch.nn.functional.conv2d(x, phase_weights(weight), None if bias is None else bias.repeat(4),
                                   padding=1)  # [N, 4 O, H + 1, W + 1]: a 2x2 kernel over the source padded by 1
    y = y.view(n, 2, 2, out, h + 1, w + 1)
    rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)]
    frames = torch.stack(rows, -3).reshape(n, out, 2 * h, 2 * w)  # [N, O, H, 2, W, 2] -> [N, O, 2H, 2W]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # the input's layout, as the stock convolution and the transposed one keep it (compiled: the
        # interleave writes it so; eager: a copy)
        frames = frames.contiguous(memory_format=torch.channels_last)
    return frames


def _upsample_conv_of(m: nn.Module) -> nn.Module | None:
    return getattr(m, "conv" if getattr(m, "name", None) == "conv" else "Conv2d_0", None)


def _foldable_upsample(m: nn.Module) -> bool:
    from diffusers.models.upsampling import Upsample2D

    conv = _upsample_conv_of(m)
    return (type(m) is Upsample2D and m.use_conv and not m.use_conv_transpose and m.interpolate and m.norm is None
            and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


@functools.cache
def _folded_upsample_class() -> type:
    from diffusers.models.upsampling import Upsample2D

    class FoldedUpsample2D(Upsample2D):
        """diffusers' Upsample2D with its upsampling folded into its convolution (`fold_upsample`)."""
        fold = "transposed"

        def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
            # (the convolution's weights are read, not its module called: hooks on it do not run)
            doubled = tuple(2 * s for s in hidden_states.shape[-2:])
            if (hidden_states.dim() != 4 or args or kwargs
                    or (output_size is not None and tuple(output_size) != doubled)):
                return super().forward(hidden_states, output_size, *args, **kwargs)
            conv = _upsample_conv_of(self)
            return upsample_conv(hidden_states, conv.weight, conv.bias, self.fold)

    # pickled by name, found through this module's __getattr__
    FoldedUpsample2D.__module__, FoldedUpsample2D.__qualname__ = __name__, "FoldedUpsample2D"
    return FoldedUpsample2D


def __getattr__(name: str):
    if name == "FoldedUpsample2D":  # built on first use: diffusers is imported only then
        return _folded_upsample_class()
    if name == "FusedGEGLU":
        return _fused_geglu_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fold_upsample(model: nn.Module, how: str) -> int:
    """Every plain diffusers Upsample2D of `model` (nearest 2x, then a 3x3 convolution) computes both as one
    convolution of the source (`upsample_conv`, `how` in UPSAMPLE_FOLDS); returns how many.

    SVD-XT: the UNet's 3 upsamplers are 7.6 of a guided step's 160 TFLOP at 1024x576, the VAE decoder's 3
    are 12.5 of an 8-frame chunk's 55.5; folded, 5/9 of that is not computed, nor the upsampled tensor
    (2.4 GB for the decoder's last one per 8-frame chunk) written and read. The convolution's weights stay
    as they are (names, state dict, dtype, device); the folded taps are computed from them at each call
    (elementwise work over the weights: ~0.2-0.3 GB of traffic a step for SVD-XT's UNet, ~0.05 ms of an
    H200's bandwidth, inside the graph torch.compile makes). A call with an explicit
    `output_size` other than twice the input (the UNet's, for sizes not divisible by its 8x) runs the
    stock code.
    """
    if how not in UPSAMPLE_FOLDS:
        raise ValueError(f"fold_upsample: {how!r} is not one of {list(UPSAMPLE_FOLDS)}")
    cls = _folded_upsample_class()

    def make(m: nn.Module) -> nn.Module:
        new = cls.__new__(cls)
        new.__dict__ = m.__dict__.copy()  # submodules, parameters, hooks: the module's own
        new.fold = how
        return new

    return _replace_modules(model, lambda _, m: _foldable_upsample(m), make)


# -- GEGLU fused into its projection -----------------------------------------------------------------

#: device types the fused GEGLU kernel runs on (Triton's GPUs); calls elsewhere run diffusers' code
GEGLU_DEVICES = ("cuda",)
_geglu_linear = None  # geglu_kernel.geglu_linear, once a model asked for it (Triton imported then)


def _fusable_geglu(m: nn.Module) -> bool:
    from diffusers.models.activations import GEGLU

    return type(m) is GEGLU and type(m.proj) is nn.Linear


@functools.cache
def _fused_geglu_class() -> type:
    from diffusers.models.activations import GEGLU

    class FusedGEGLU(GEGLU):
        """diffusers' GEGLU with its projection, split, GELU and product in one Triton kernel (`fused_geglu`)."""

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            # (the projection's weights are read, not its module called: hooks on it do not run)
            w, b = self.proj.weight, self.proj.bias
            if (args or kwargs or hidden_states.device.type not in GEGLU_DEVICES
                    or hidden_states.dtype not in (torch.float16, torch.bfloat16, torch.float32)
                    or w.dtype != hidden_states.dtype or (b is not None and b.dtype != w.dtype)
                    or (hidden_states.dtype == torch.float32 and hidden_states.is_cuda)  # tl.dot: TF32
                    or (torch.is_grad_enabled() and (hidden_states.requires_grad or w.requires_grad))):
                return super().forward(hidden_states, *args, **kwargs)
            return (_geglu_linear or _load_geglu())(hidden_states, w, b)

    FusedGEGLU.__module__, FusedGEGLU.__qualname__ = __name__, "FusedGEGLU"
    return FusedGEGLU


def _load_geglu():
    """The kernel's Python entry (Triton imported now): a model unpickled in a process that never called
    `fused_geglu` finds it too."""
    global _geglu_linear
    try:
        from . import geglu_kernel
    except ImportError as exc:
        raise ValueError(f"fused_geglu: needs Triton ({exc})") from exc
    _geglu_linear = geglu_kernel.geglu_linear
    return _geglu_linear


def fused_geglu_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `fused_geglu` cannot run for an instance on `device` in `dtype`; None if it can."""
    if device.type not in GEGLU_DEVICES:
        return f"needs a GPU instance (a Triton kernel), not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 weights, not {str(dtype).removeprefix('torch.')}"
    try:
        _load_geglu()
    except ValueError as exc:
        return str(exc).removeprefix("fused_geglu: ")
    return None


def fused_geglu(model: nn.Module) -> int:
    """Every diffusers GEGLU of `model` whose projection is a plain nn.Linear computes value * gelu(gate)
    from its input in one Triton kernel (`geglu_kernel`); returns how many.

    diffusers writes the projection's output, twice as wide as the result, then reads it back for the
    GELU and the product. SVD-XT at 1024x576 with guidance: 48 GEGLUs a step (15 at 460800 tokens x 320
    channels into 1280, 15 at 115200 x 640 into 2560, 15 at 28800 x 1280 into 5120, 3 at 7200), 34.5 of
    the step's 160 TFLOP, and ~125 GB of that round trip a step (~26 ms of an H200's 4.8 TB/s). The
    result is rounded once from float32 (the stock form rounds the projection to 16 bit first): the frames
    differ by that rounding. float16 and bfloat16 on the GPU (float32 there runs diffusers' code: Triton's
    dot would use TF32); projections made FP8 (`fp8`) are not plain linears and stay as they are. Needs
    Triton (torch's CUDA builds bring it); weights, names and state dicts unchanged.
    """
    _load_geglu()
    cls = _fused_geglu_class()

    def make(m: nn.Module) -> nn.Module:
        new = cls.__new__(cls)
        new.__dict__ = m.__dict__.copy()
        return new

    return _replace_modules(model, lambda _, m: _fusable_geglu(m), make)


# -- cross-attention over one token -------------------------------------------------------------------

class OneTokenCrossAttention:
    """An attention processor for cross-attention whose key/value sequence is one token long.

    Softmax over a single key is exactly 1 whatever the query, so the attention output is the value
    projection of that token for every query position: out = to_out(to_v(context)), broadcast. SVD
    conditions every cross-attention (16 spatial, 16 temporal in SVD-XT) on one CLIP image embedding,
    so this skips, per call, the query projection and the output projection over every token (~6
    TFLOP of the 160 of a guided SVD-XT step), the key projection, and an attention call that cuDNN
    refuses (one key) and flash runs at a fraction of bandwidth (~23 ms a step on an H200). The
    numbers are the same up to the rounding of a differently-shaped output GEMM. Calls of any other
    shape (longer context, a mask, 4-d input) go to the processor it wraps.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if (not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3
                or encoder_hidden_states.shape[1] != 1 or attention_mask is not None or hidden_states.dim() != 3
                or args or kwargs):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if hasattr(attn, "to_v"):
            value = attn.to_v(context)
        else:  # fuse_qkv: key and value in one projection (value second), over the few context rows
            value = attn.to_kv(context).chunk(2, dim=-1)[1]
        out = attn.to_out[1](attn.to_out[0](value.to(hidden_states.dtype)))  # [B, 1, C]
        out = out.expand(hidden_states.shape[0], hidden_states.shape[1], out.shape[-1])
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def fold_cross_attention(model: nn.Module) -> int:
    """Wraps the processor of every plain cross-attention of `model` in `OneTokenCrossAttention`;
    returns how many. Apply after `fuse_qkv` (it reads the fused projection too).

    Only diffusers' standard processors are wrapped (what SVD uses): others may attend to more than
    the context (added key/value projections of the hidden states), take several contexts (IP
    adapters) or carry weights and logic of their own (LoRA, custom processors), where the fold would
    be wrong or bypass them.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    n = 0
    for m in model.modules():
        if (isinstance(m, Attention) and m.is_cross_attention
                and type(m.processor) in (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)
                and getattr(m, "add_k_proj", None) is None and not getattr(m, "only_cross_attention", False)
                and (getattr(m, "to_v", None) is not None or hasattr(m, "to_kv"))):
            m.set_processor(OneTokenCrossAttention(m.processor))
            n += 1
    return n


# -- FlashAttention-4 -------------------------------------------------------------------------------

#: the module of the flash-attn-4 package (CuTe DSL kernels, forward for compute capability 9.x and 10.x)
FA4_MODULE = "flash_attn.cute.interface"
#: head sizes FA4's forward takes, by compute capability major (its interface's `_validate_head_dims`)
FA4_HEAD_DIMS = {9: frozenset(range(8, 257, 8)), 10: frozenset(range(8, 129, 8)) | {256}}
FA4_CAPABILITIES = tuple(FA4_HEAD_DIMS)
#: FA4's sm90 forward puts the batch on the grid's z dimension (at most 65535 blocks); larger batches (the
#: temporal attention's batch is 2 x requests x latent pixels) go to the wrapped processor
FA4_MAX_BATCH = 65535

_fa4_lock = threading.Lock()
_fa4_op = None


def fa4_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-4 cannot run on `device` in `dtype` (None: it can). Imports the package."""
    if device.type != "cuda":
        return f"needs a CUDA GPU of compute capability {' or '.join(f'{c}.x' for c in FA4_CAPABILITIES)}, not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FA4_CAPABILITIES:
        return (f"needs a GPU of compute capability {' or '.join(f'{c}.x' for c in FA4_CAPABILITIES)} "
                f"(Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"runs in float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    try:
        import importlib
        importlib.import_module(FA4_MODULE)
    except Exception as exc:  # ImportError, or the CUTLASS DSL's own failure to find its libraries
        return f"needs the flash-attn-4 package (pip install flash-attn-4): {type(exc).__name__}: {exc}"
    return None


def keep_fa4_kernels(folder: Path) -> bool:
    """FA4's compiled kernels kept on disk in `folder` (its own cache, off by default), so that a restart
    loads them instead of compiling them again in the warm-up. FA4 reads the setting once, at import:
    a process that imported it already, or whose environment chose otherwise, keeps what it has.
    Returns whether `folder` is FA4's cache now."""
    import os
    import sys

    if FA4_MODULE in sys.modules:
        return os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR") == str(folder)
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(folder))
    return (os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
            and os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(folder))


def fa4_attention_op():
    """`videogen::fa4_attention(q, k, v, scale)`: FA4's forward over [batch, tokens, heads, head_dim], as a
    custom op, so that torch.compile keeps it whole (Dynamo cannot trace the CuTe DSL) and knows its output
    (a new contiguous tensor shaped like q) without running it. Registered once per process, on first use."""
    global _fa4_op
    with _fa4_lock:
        if _fa4_op is None:
            @torch.library.custom_op("videogen::fa4_attention", mutates_args=(), device_types="cuda")
            def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
                import importlib
                out = importlib.import_module(FA4_MODULE).flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
                return out[0] if isinstance(out, tuple) else out

            @fa4_attention.register_fake
            def _(q, k, v, scale):
                return q.new_empty(q.shape)

            _fa4_op = fa4_attention
        return _fa4_op


class FlashAttention4:
    """A self-attention processor that runs the attention itself through `kernel` (FA4's op) over the
    projections laid out as [batch, tokens, heads, head_dim], the layout they come out of the linear layers
    in; the projections, output layers, residual and rescaling are the standard processors' (diffusers'
    AttnProcessor2_0 and FusedAttnProcessor2_0), in the same order, so only the attention kernel differs.
    Calls of any other kind (cross-attention, a mask, 4-d input, a norm on the input, query or key) go to
    the processor it wraps. The scale is SDPA's default, head_dim ** -0.5, as the standard processors use.
    """

    def __init__(self, inner, kernel=None, max_batch: int = FA4_MAX_BATCH) -> None:
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        self.inner = inner
        self.kernel = kernel if kernel is not None else fa4_attention_op()
        self.fused = isinstance(inner, FusedAttnProcessor2_0)  # fuse_qkv: one projection (to_qkv)
        self.max_batch = max_batch

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 3
                or hidden_states.shape[0] > self.max_batch or args or kwargs):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if self.fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        batch, tokens = hidden_states.shape[:2]
        head_dim = key.shape[-1] // attn.heads
        shape = (batch, tokens, attn.heads, head_dim)
        out = self.kernel(query.view(shape), key.view(shape), value.view(shape), head_dim ** -0.5)
        out = out.reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def flash_attention_4(model: nn.Module, kernel=None, head_dims=FA4_HEAD_DIMS[9]) -> int:
    """Wraps the processor of every plain self-attention of `model` whose head size is in `head_dims` (FA4's
    for the device: `FA4_HEAD_DIMS[major]`) in `FlashAttention4`; returns how many. Apply after `fuse_qkv`
    (it reads the fused projection too).

    Only diffusers' SDPA processors (AttnProcessor2_0, FusedAttnProcessor2_0), whose scale the wrapper
    keeps (SDPA's default; the older AttnProcessor uses `attn.scale`, 1 where diffusers picks it), and only
    modules without norms of their own (spatial, group, query or key norms) or fewer key/value heads
    than query heads, which the wrapper does not handle. SVD's UNet: its 32 self-attentions (spatial
    and temporal), head size 64. The VAE's one attention has a head size of 512 and stays on SDPA.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    n = 0
    for m in model.modules():
        if (isinstance(m, Attention) and not m.is_cross_attention
                and type(m.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0)
                and getattr(m, "add_q_proj", None) is None and getattr(m, "add_k_proj", None) is None
                and m.spatial_norm is None and m.group_norm is None
                and getattr(m, "norm_q", None) is None and getattr(m, "norm_k", None) is None
                and m.inner_dim % m.heads == 0 and m.inner_dim // m.heads in head_dims
                and getattr(m, "inner_kv_dim", m.inner_dim) == m.inner_dim):
            m.set_processor(FlashAttention4(m.processor, kernel))
            n += 1
    return n


# -- fused projections -----------------------------------------------------------------------------

def fuse_qkv(model: nn.Module) -> int:
    """Fuses every diffusers Attention's projections (one GEMM instead of three or two) and switches it to
    the fused processor. The separate projections are dropped so the weights are not held twice."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    n = 0
    for m in model.modules():
        if isinstance(m, Attention) and not getattr(m, "fused_projections", False):
            m.fuse_projections()
            m.set_processor(FusedAttnProcessor2_0())
            # the fused processor reads to_qkv (self-attention) or to_q + to_kv (cross-attention)
            drop = ("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v")
            for name in drop:
                delattr(m, name)
            n += 1
    return n


# -- feed-forward over row blocks ---------------------------------------------------------------------

#: tokens per feed-forward block under forward_chunking: true. At 1024x576 x 25 frames the top level's
#: 460800 tokens go in 15 blocks; each block's GEGLU intermediate is ~0.4 GB instead of ~4.7 GB at once.
FF_BLOCK_ROWS = 32768


def chunk_feed_forward(model: nn.Module, max_rows: int = FF_BLOCK_ROWS) -> int:
    """Runs every diffusers FeedForward of `model` over contiguous blocks of at most `max_rows` tokens.

    A feed-forward acts on each token alone, so blocks of rows give the same result with a fraction of
    the 4x-wide intermediate alive at once. diffusers' own `enable_forward_chunking` splits along the
    batch-frames or frame axis instead, one slice each: the temporal blocks' slices are strided
    (tokens x 1 x channels), and cuBLAS ran them on narrow-tile kernels at 3.3 s of GEMM per step
    (H200, SVD-XT, against 0.12 s unchunked). Returns how many modules it changed; parameter names stay.
    """
    from diffusers.models.attention import FeedForward

    if max_rows < 1:
        raise ValueError(f"forward_chunking: a block needs at least one row, got {max_rows}")
    n = 0
    for m in model.modules():
        if isinstance(m, FeedForward) and not hasattr(m, "_videogen_block_rows"):
            m._videogen_block_rows = max_rows
            m.forward = _RowBlocks(m.forward, max_rows)  # instance attribute: nn.Module.__call__ reads it
            n += 1
    return n


class _RowBlocks:
    def __init__(self, forward, max_rows: int) -> None:
        self.forward, self.max_rows = forward, max_rows

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        lead, width = hidden_states.shape[:-1], hidden_states.shape[-1]
        rows = lead.numel()
        if rows <= self.max_rows:
            return self.forward(hidden_states, *args, **kwargs)
        flat = hidden_states.reshape(rows, width)  # a copy for the temporal blocks' permuted view
        blocks = -(-rows // self.max_rows)
        step = -(-rows // blocks)  # even blocks: no tiny last GEMM
        first = self.forward(flat[:step], *args, **kwargs)
        out = first.new_empty((rows, first.shape[-1]))
        out[:step] = first
        del first
        for start in range(step, rows, step):
            out[start:start + step] = self.forward(flat[start:start + step], *args, **kwargs)
        return out.reshape(*lead, out.shape[-1])


# -- VAE decoder compiled with a dynamic frame dimension ---------------------------------------------

class _Decode(nn.Module):
    """One video's chunk of latents [F, C, h, w] -> frames [F, 3, H, W]; F is read from the tensor."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, num_frames=z.shape[0]).sample


def parse_compile_options(text: str, key_name: str = "compile_options") -> dict[str, object]:
    """`key=value;key=value` -> Inductor options; values true/false, integers, floats or strings.
    Errors name `key_name`, the parameter the text came from."""
    out: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"{key_name}: {item!r} is not key=value")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def check_compile_options(options: dict[str, object], key_name: str = "compile_options") -> None:
    """Refuses Inductor option names that torch does not know, naming them and the parameter."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"{key_name}: unknown Inductor option(s) {unknown}")


def compile_module(model: nn.Module, mode: str, options: dict[str, object], **kwargs):
    """torch.compile(model, mode=mode), or with the mode's Inductor options plus `options` when given
    (torch.compile takes a mode or options, not both). Unknown option names are refused by name."""
    if not options:
        return torch.compile(model, **({} if mode == "default" else {"mode": mode}), **kwargs)
    import torch._inductor as inductor

    check_compile_options(options)
    return torch.compile(model, options={**inductor.list_mode_options(mode), **options}, **kwargs)


def records_cuda_graphs(mode: str, options: dict[str, object]) -> bool:
    """Whether torch.compile with this mode and these Inductor options records CUDA graphs."""
    if mode == "none":
        return False
    if "triton.cudagraphs" in options:
        return bool(options["triton.cudagraphs"])
    return mode in ("reduce-overhead", "max-autotune")


def cuda_graphs_thread_problem() -> str | None:
    """Why this thread may not record CUDA graphs, or None. Call it on the thread that will run them.

    Before torch 2.13 (pytorch#123177, fixed by #184357), CUDA-graph trees keep their state in
    thread-local storage made only on the thread that first imports them: any other thread fails a bare
    assert at its first graph. And one compiled graph keeps the tree manager of the first thread that ran
    it, whichever thread runs it later: Dynamo hands a second instance of the same model on the same
    device the first one's graph, so two instances (or a reload beside the version it replaces) would
    replay one manager's graphs and buffers at once. On such a torch one thread per process records CUDA
    graphs: the first to ask. The import below makes this thread that one if no thread was before."""
    import torch._inductor.cudagraph_trees as trees

    if hasattr(trees, "_initialize_tls"):  # the fix: state made on each thread at first use, per thread
        return None
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return None
    return (f"torch {torch.__version__} records CUDA graphs on one thread per process only (pytorch#123177, "
            f"fixed in torch 2.13) and another thread of this process has them (another instance, one unloaded "
            f"before, or the main thread): serve one instance per process (count 1 on one GPU; scale out with "
            f"replicas) and restart the server rather than reload it, or use a mode without CUDA graphs "
            f"(default, max-autotune-no-cudagraphs)")


class CompiledDecoder:
    """The VAE decode of one chunk under torch.compile, with the frame dimension left dynamic.

    Torch specialises sizes 0 and 1, so a one-frame chunk (25 frames in chunks of 8 end with one) has a
    graph of its own; the rest share graphs with a symbolic frame count. That range splits further
    wherever a size-dependent choice made while tracing flips: Inductor indexes with 32-bit integers
    while every tensor has fewer than 2^31 elements (at 1024x576 the decoder's 256-channel upsampling
    output passes that at 15 frames), and the convolution backend's choice (oneDNN on CPU splits at
    16 frames, and at a few frames for small images once the temporal convolutions are 2-d) guards
    on the frame count. Where the splits fall depends on the size, the device and the options, so
    `warm` decodes a chunk of every length from 1 to `max_chunk` at a latent size, before the first
    request at that size decodes anything: whatever the splits, every chunk length up to the model's
    max_decode_chunk_size then finds its graph (a graph is built only where one is missing; the rest
    is one decode per length: 36 frames for a limit of 8). Spatial sizes are static.
    """

    def __init__(self, vae: nn.Module, mode: str, max_chunk: int, options: dict[str, object] | None = None) -> None:
        # static shapes but for the frame dimension marked at each call (else a second spatial size would
        # make height and width symbolic too: generic kernels)
        self.options = dict(options or {})
        self._fn = compile_module(_Decode(vae), mode, self.options, fullgraph=True, dynamic=False)
        self.sizes: set[tuple[int, int]] = set()  # latent sizes (h, w) whose graphs are built
        self.max_chunk = max_chunk
        self.records_graphs = records_cuda_graphs(mode, self.options)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[0] >= 2:
            torch._dynamo.maybe_mark_dynamic(z, 0)
        return self._fn(z)

    def warm(self, latents: torch.Tensor) -> bool:
        """Builds the graphs for latents [F, C, h, w] of this size; False if that was done before."""
        _, channels, h, w = latents.shape
        if (h, w) in self.sizes:
            return False
        # CUDA-graph trees run a new graph once without recording it and record it at its next call: twice
        # each, so that serving never pays a recording (and its pool growth) in a request's decode
        for n in range(1, self.max_chunk + 1):
            for _ in range(2 if self.records_graphs and latents.device.type == "cuda" else 1):
                self(torch.zeros(n, channels, h, w, dtype=latents.dtype, device=latents.device))
        self.sizes.add((h, w))
        return True


# -- how many graphs each instance compiled ---------------------------------------------------------

class GraphCounter:
    """Counts torch.compile's frame compilations per thread.

    Each instance initialises, warms up and serves on its own thread, and Dynamo compiles a frame on
    the calling thread: a bytecode hook (called once per compiled frame) that reads the current thread
    attributes every graph to the instance that built it. torch's own counters are process-wide, its
    `recompiles` counter is not kept by recent releases, and its compile callbacks are cleared by
    torch._dynamo.reset() and fire once for overlapping compiles of several threads.

    The same hook attributes Inductor's graph-cache lookups (found, compiled from scratch, not cacheable):
    Dynamo compiles one frame at a time (its compile lock) and the hook runs at the end of each, on its
    thread, so the change in torch's process-wide counters since the previous hook is that frame's.
    """

    _lock = threading.Lock()
    _counts: dict[int, int] = {}
    _lookups: dict[int, tuple[int, int, int]] = {}  # thread -> (hits, misses, bypasses)
    _last = (0, 0, 0)
    _installed = False

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            from torch._dynamo.convert_frame import register_bytecode_hook

            def on_compiled(code, new_code):
                ident = threading.get_ident()
                now = _fx_cache_counters()
                with cls._lock:
                    cls._counts[ident] = cls._counts.get(ident, 0) + 1
                    # counters cleared since (torch._dynamo.reset in tests): what they hold now is new
                    delta = [n - last if n >= last else n for n, last in zip(now, cls._last)]
                    cls._last = now
                    cls._lookups[ident] = tuple(a + d for a, d in zip(cls._lookups.get(ident, (0, 0, 0)), delta))
                return None  # keep Dynamo's bytecode

            cls._last = _fx_cache_counters()
            register_bytecode_hook(on_compiled)
            cls._installed = True

    @classmethod
    def count(cls, thread_ident: int) -> int:
        with cls._lock:
            return cls._counts.get(thread_ident, 0)

    @classmethod
    def lookups(cls, thread_ident: int) -> tuple[int, int, int]:
        """(found, compiled from scratch, not cacheable) Inductor graphs of this thread's compiles."""
        with cls._lock:
            return cls._lookups.get(thread_ident, (0, 0, 0))


def _fx_cache_counters() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"], inductor["fxgraph_cache_bypass"]


_cache_dir: str | None = None
_cache_lock = threading.Lock()


def use_compile_cache(path: str) -> bool:
    """Points Inductor's and Triton's on-disk caches at `path` (FX graphs, AOTAutograd entries, kernels).

    Process-wide: the first call wins and later different paths are logged and ignored. It sets the
    variables outright rather than by default: importing diffusers already lets Inductor fill in its own
    default (/tmp/torchinductor_<user>), so a default-only setting would never take effect.

    A folder this process cannot write (a ReadWriteMany volume that Kubernetes' fsGroup does not reach:
    NFS, most file-store CSI drivers) is logged as an error and left out: the model compiles into the
    process's own cache and serves, its restarts compiling from scratch, rather than failing to load (a
    pod that never becomes ready) or failing in the warm-up's first compile, minutes in, deep inside
    Inductor. Returns whether `path` is the cache now.
    """
    global _cache_dir
    import os
    import tempfile

    with _cache_lock:
        if _cache_dir is None:
            try:
                os.makedirs(path, exist_ok=True)
                tempfile.TemporaryFile(dir=path).close()
                _check_tree_writable(path)
            except OSError as err:
                log.error("compile_cache_dir: %s is not a folder this process (uid %s) can write (%s); compiling "
                          "into %s instead, which a restart does not keep: make the folder writable for this "
                          "user", path, os.getuid(), err.strerror or err,
                          os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "Inductor's default cache")
                return False
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
            os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
            _cache_dir = path
            # compile artifacts another model unpacked into the previous folder: where lookups go now too
            for loaded in _unpacked:
                _unpack(loaded, f"again, into compile_cache_dir {path}")
            return True
        if _cache_dir != path:
            log.warning("compile_cache_dir %s ignored: this process already caches compiled code in %s", path,
                        _cache_dir)
        return _cache_dir == path


#: folders of a compile cache looked at for write access (a cache holds a few thousand at most)
MAX_CACHE_FOLDERS_CHECKED = 50_000


def _check_tree_writable(path: str) -> None:
    """OSError naming the first folder under `path` this process cannot write: Inductor writes its locks and
    new entries into folders an earlier run made, and one made by another uid (a debugging run as root, an
    image whose user changed, NFS root squash) failed the warm-up's first compile, the version FAILED,
    where the top folder alone passed (review)."""
    import errno
    import os

    def unlistable(err: OSError) -> None:  # (os.walk passes over a folder it cannot list, unchecked)
        raise OSError(errno.EACCES, f"{err.filename} inside it cannot be read") from None

    for n, (folder, _dirs, _files) in enumerate(os.walk(path, onerror=unlistable)):
        if n >= MAX_CACHE_FOLDERS_CHECKED:
            log.info("compile_cache_dir %s: its first %d folders checked for write access, not the rest", path, n)
            return
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, f"{folder} inside it is not writable")


# -- the portable compile cache (torch's "Mega-Cache") ----------------------------------------------

_artifacts_lock = threading.Lock()
_artifacts_loaded: dict[tuple, tuple[str, bool]] = {}  # (file, its identity) -> what loading it gave
_unpacked: list[Path] = []  # files unpacked into the compile cache in force (again if compile_cache_dir moves it)


def artifacts_name(device: torch.device) -> str:
    """The file in a compile_artifacts folder for what this process compiles on `device`.

    Compiled code is specific to the torch build, the Python version and the device model (Triton's
    kernels to the GPU architecture, Inductor's C++ to the CPU's vector instructions and thread count),
    and each combination gets its own file, so one model repository can serve a mixed fleet.
    """
    import platform
    import re
    import sys

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name}-sm{props.major}{props.minor}"
    else:
        # Inductor's C++ is built for the vector instructions it picks here (AVX-512 code loaded on an AVX2
        # host is a cache hit that computes garbage: its key does not hold them), and its entries are keyed
        # by the thread count (another --cpu-threads never hits): both in the name
        from torch._inductor import cpu_vec_isa

        picked = cpu_vec_isa.pick_vec_isa()  # (an InvalidVecISA, false, where none is usable)
        isa = str(picked).replace(" ", "+") if picked else "novec"
        where = f"{device.type}-{platform.machine()}-{isa}-t{torch.get_num_threads()}"
    name = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{where}.bin"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", name)


def cache_lookups() -> tuple[int, int]:
    """(hits, misses) of this process's Inductor graph cache: a miss is a graph Inductor compiled from
    scratch (its kernels generated and built). Process-wide, like torch's counters (per thread:
    GraphCounter.lookups)."""
    return _fx_cache_counters()[:2]


def load_compile_artifacts(folder: Path, device: torch.device, *, warn_missing: bool = True) -> tuple[str, bool] | None:
    """Loads `folder`'s artifacts for this torch, Python and device into the process's compile caches, so
    that compiling finds Inductor's graphs, AOTAutograd's entries and (bundled in them) Triton's kernels
    instead of building them: a warm start on a machine whose own cache is empty. Once per file per
    process, before anything compiles. Returns a line for the load log and whether the file was loaded;
    None if the folder is absent.

    A folder without this combination's file, or a file torch cannot read or unpack (written by another
    torch release, a full disk), is logged and left out: the model compiles from scratch, as without the
    folder. A file that changed since (a reload after a new build) is loaded again.

    The entries are unpacked into the compile cache folder in force; if a model's `compile_cache_dir`
    moves it afterwards, they are unpacked there again (`use_compile_cache`). A folder holding no file at
    all (a build that failed after creating it) counts as absent.
    """
    if not folder.is_dir() or not any(folder.glob("*.bin")):
        return None
    path = folder / artifacts_name(device)
    try:
        st = path.stat()
        key: tuple = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path),)
    with _artifacts_lock:
        if key in _artifacts_loaded:
            return _artifacts_loaded[key]
        if not path.is_file():
            others = sorted(p.name for p in folder.glob("*.bin"))
            (log.warning if warn_missing else log.debug)(
                "%s has no compile artifacts for this torch, Python and device (%s; it has %s): compiling from "
                "scratch. `videogen-server compile-artifacts` on this kind of machine writes them",
                folder, path.name, ", ".join(others) or "none")
            outcome = (f"compile artifacts: none for {path.name}", False)
        else:
            t0 = time.perf_counter()
            try:
                data = path.read_bytes()
            except OSError as err:
                log.error("compile artifacts %s cannot be read (%s): compiling from scratch", path,
                          err.strerror or err)
                data = b""
            else:
                if not data:  # (a node lost before the build's write reached the disk)
                    log.error("compile artifacts %s is empty: compiling from scratch; build it again", path)
            info = None
            if data:
                with _cache_lock:  # not while compile_cache_dir moves the cache
                    info = _unpack(path, "", data)
                    if info is not None:
                        _unpacked.append(path)
            if info is None:
                outcome = (f"compile artifacts: {path.name} not loaded", False)
            else:
                entries = sum(len(v) for v in getattr(info, "artifacts", {}).values())
                outcome = (f"compile artifacts {path.name} ({entries} entries, {len(data) / 2**20:.1f} MiB, "
                           f"{time.perf_counter() - t0:.2f}s)", True)
        _artifacts_loaded[key] = outcome
        return outcome


def _unpack(path: Path, why: str, data: bytes | None = None):
    """torch.compiler.load_cache_artifacts of one file into the compile cache in force; its CacheInfo, or None
    (logged) if it cannot be read or unpacked."""
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes() if data is None else data)
        if info is None:
            log.error("compile artifacts %s could not be loaded (torch's warning above says why): compiling from "
                      "scratch", path)
        elif why:
            log.info("compile artifacts %s unpacked %s", path, why)
        return info
    except Exception as err:  # noqa: BLE001 - unpacking into the cache (a full disk...): compile instead
        log.error("compile artifacts %s could not be unpacked into the compile cache (%s: %s): compiling from "
                  "scratch", path, type(err).__name__, err)
        return None


def check_writable(folder: Path) -> None:
    """Raises OSError, naming `folder` and this process's user, unless a compile artifact can be written there
    (before minutes of loading and compiling, rather than after)."""
    import os
    import tempfile

    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        if created:  # made again by the save; a build that fails in between leaves no empty folder behind
            folder.rmdir()
    except OSError as err:
        raise OSError(err.errno, f"cannot write compile artifacts to {folder} as uid {os.getuid()}: "
                                 f"{err.strerror or err}") from err


def save_compile_artifacts(folder: Path, device: torch.device) -> tuple[Path, int]:
    """Writes every compile artifact this process built or found so far (its graphs, kernels, autotuning
    results) to `folder`'s file for this torch, Python and device, atomically (a reader never sees half a
    file). Returns the file and its size; raises OSError if `folder` cannot be written, RuntimeError if
    nothing was compiled (the graphs are built by the warm-up requests)."""
    import os
    import tempfile
    from torch._dynamo import convert_frame

    with _artifacts_lock:
        # torch records artifacts under Dynamo's compile lock: no instance adds one while they are read
        with getattr(convert_frame, "compile_lock", None) or contextlib.nullcontext():
            saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("compile artifacts: nothing was compiled, so there is nothing to write; the graphs are "
                               "built by the model's warm-up: add model_warmup requests of the shapes it serves")
        data = saved[0]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / artifacts_name(device)
        for stale in folder.glob(f".{path.name}.*"):  # a build killed mid-write (a deadline, out of memory)
            with contextlib.suppress(OSError):
                stale.unlink()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on the disk before the rename: a crash after it leaves no empty file
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the servers (another uid, often) out
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path, len(data)


# Dynamo's refusal to build one more graph of a code object under fullgraph (renamed across releases)
RECOMPILE_LIMIT_HIT = tuple(getattr(torch._dynamo.exc, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                            if hasattr(torch._dynamo.exc, n))


def recompile_limit() -> int:
    cfg = torch._dynamo.config
    return next(getattr(cfg, n) for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n))


def raise_recompile_limit(limit: int = 64) -> None:
    """Every shape bucket and every instance of a model is one more graph of the same code object
    (the VAE decoder: 2-3 per size). Past Dynamo's limit (default 8) a fullgraph compile raises, and
    the request that needed the graph fails."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
            break


# -- low-memory mode ---------------------------------------------------------------------------------

class PhaseOffload:
    """Keeps models in pinned host memory and puts one at a time on the device, for its phase.

    diffusers' `enable_model_cpu_offload` does the same through accelerate's forward hooks, which move
    a model back with a device-to-host copy into fresh pageable memory. Here the host copy is the
    master: bringing a model in is one asynchronous copy from pinned memory, taking it out only
    re-points its tensors at the host copy. Each model's tensors live in one flat host buffer (pinned
    on a GPU machine: per-tensor pinning rounds every block up to a power of two, ~30 % more for the
    SVD-XT UNet), each with its own strides (channels_last weights stay channels_last).
    Apply every change to the weights (dtype, memory format, fusion) before building this.
    """

    ALIGN = 64  # bytes between tensors in the flat buffer

    def __init__(self, models: dict[str, nn.Module], device: torch.device) -> None:
        self.device = device
        self.current: str | None = None
        self._tensors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, model in models.items():
            model.to("cpu")
            tensors = _tensors(model)
            sizes = [t.numel() * t.element_size() for t in tensors]
            offsets, total = [], 0
            for n in sizes:
                offsets.append(total)
                total += -(-n // self.ALIGN) * self.ALIGN
            flat = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=device.type == "cuda")
            pairs = []
            for t, off, n in zip(tensors, offsets, sizes):
                strides = t.stride() if _dense(t) else None
                host = flat[off:off + n].view(t.dtype)
                host = host.as_strided(t.shape, strides) if strides is not None else host.view(t.shape)
                host.copy_(t.data)
                t.data = host
                pairs.append((t, host))
            self._tensors[name] = pairs

    def use(self, name: str) -> None:
        """Puts `name` on the device, and the model there before it back on the host."""
        if self.current == name:
            return
        if self.current is not None:
            self.release()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the freed weights go back to the device for the next model
        for t, host in self._tensors[name]:
            t.data = host.to(self.device, non_blocking=True, copy=True)
        self.current = name

    def write_back(self, name: str, tensors) -> None:
        """Copies `tensors` of model `name` into their host masters: values set while the model was on the
        device (the host copies are not written back by `release`), for its next trip there."""
        wanted = {id(t) for t in tensors}
        for t, host in self._tensors[name]:
            if id(t) in wanted and t.data.data_ptr() != host.data_ptr():
                host.copy_(t.data)

    def release(self) -> None:
        """Takes the model on the device off it (its tensors point at their host copies again)."""
        if self.current is not None:
            for t, host in self._tensors[self.current]:
                t.data = host
            self.current = None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())  # each shared tensor once


def _dense(t: torch.Tensor) -> bool:
    """A tensor that owns exactly its storage from offset 0 (contiguous in some dimension order)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()

