"""The CLIP branch of SVD's preprocessing for large images: the same resize, computed where it is sampled.

diffusers' pipeline makes the image encoder's 224x224 input with `_resize_with_antialiasing`: the whole
image as float32, a separable Gaussian blur over every pixel (sigma = (scale - 1) / 2 per axis, kernels of
~4 sigma, reflected borders), then a bicubic resize (align_corners) that reads 4x4 blurred pixels per output
pixel. The blur's cost is the pixels times the kernels' lengths: ~2.4 s for a 12 MP photo and ~26 s for a
36 MP one on one core here, and for a long thin image (8 x 5 000 000 is within the default pixel limit) a
kernel of ~45 000 taps (8 x 1 000 000 took ~40 s here; 8 x 5 000 000, extrapolated, tens of minutes). Most of
a request's latency on a GPU server, or a way to stall it.

Every step is linear and separable, so along each axis the blur and the bicubic sampling make one banded
matrix: output o's weights are its four bicubic weights spread by the blur's kernel over the source pixels
they reach (kernel + 3 of them, reflected at the borders). `clip_resize` applies the two matrices, the
wider one first so the intermediate stays small: the same arithmetic as diffusers' up to the order of the
float32 sums (within ~1.5e-6 of its values on [-1, 1]), touching each source pixel about twice. Pixels are
converted to float exactly as diffusers' `pil_to_numpy` does.

`blur_cost` says when this is worth it: the backend keeps diffusers' own code where its blur is cheap (so
ordinary images give bit-identical frames), and uses this above.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _gaussian

CUBIC_A = -0.75  # torch's bicubic kernel (upsample_bicubic2d)
_BLOCK_ELEMENTS = 1 << 23  # gathered values per block (32 MiB as float32): bounds the memory of one pass


def _kernel_size(n_in: int, n_out: int) -> tuple[float, int]:
    """diffusers' sigma and (odd) kernel length along an axis of n_in pixels resized to n_out."""
    sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
    size = int(max(2.0 * 2 * sigma, 3))
    return sigma, size + 1 if size % 2 == 0 else size


def blur_cost(height: int, width: int, size: tuple[int, int] = (224, 224)) -> int:
    """Multiply-adds of diffusers' blur for an RGB image of this size (what `clip_resize` avoids)."""
    return height * width * 3 * (_kernel_size(height, size[0])[1] + _kernel_size(width, size[1])[1])


def _bicubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (clamped, n_out x 4) and weights of torch's bicubic resize with align_corners=True.

    The positions are computed in float32, as torch's kernel does, so each output reads the same four
    pixels as torch's.
    """
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    real = scale * np.arange(n_out, dtype=np.float32)
    base = np.floor(real).astype(np.int64)
    t = (real - base.astype(np.float32)).astype(np.float64)

    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    index = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index, weights


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """torch's 'reflect' padding as source indices (the edge pixel is not repeated; pad < n)."""
    if n == 1:
        return np.zeros_like(index)
    index = np.abs(index)
    return np.where(index > n - 1, 2 * (n - 1) - index, index)


def _axis_band(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Blur then bicubic sampling along one axis, as a band: source indices and weights, n_out x width."""
    sigma, size = _kernel_size(n_in, n_out)
    kernel = _gaussian(size, torch.tensor([[sigma]], dtype=torch.float32))[0].numpy().astype(np.float64)
    offsets = np.arange(size) - (size - 1) // 2  # diffusers' _compute_padding: (size - 1) // 2 each side
    taps, cubic = _bicubic_taps(n_in, n_out)
    sources = [_reflect(taps[:, k:k + 1] + offsets[None, :], n_in) for k in range(4)]  # n_out x size each
    lo = np.minimum.reduce([s.min(axis=1) for s in sources])  # reflected: the span's ends need not be
    hi = np.maximum.reduce([s.max(axis=1) for s in sources])  # the first and last taps'
    width = int((hi - lo).max()) + 1
    start = np.minimum(lo, n_in - width)
    rows = np.repeat(np.arange(n_out), size)
    weights = np.zeros((n_out, width))
    for k, source in enumerate(sources):
        np.add.at(weights, (rows, (source - start[:, None]).ravel()), (cubic[:, k:k + 1] * kernel[None, :]).ravel())
    return start[:, None] + np.arange(width)[None, :], weights


def _resize_rows(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Along the columns first (height x out_w x C, float32), then along the rows: out_h x out_w x C."""
    height, _, channels = image.shape
    out_h, out_w = size
    cols, wx = _axis_band(image.shape[1], out_w)
    wx = torch.from_numpy(wx.astype(np.float32))
    width = cols.shape[1]
    per_output = width * channels
    outs_per_block = max(1, min(out_w, _BLOCK_ELEMENTS // per_output))
    rows_per_block = max(1, _BLOCK_ELEMENTS // (per_output * outs_per_block))
    across = torch.empty(height, out_w, channels, dtype=torch.float32)
    for o in range(0, out_w, outs_per_block):
        flat = cols[o:o + outs_per_block].ravel()
        n = len(flat) // width
        for top in range(0, height, rows_per_block):
            rows = image[top:top + rows_per_block]
            # pil_to_numpy's conversion (float32 / 255.0), then the pipeline's * 2 - 1, element by element
            block = torch.from_numpy(rows[:, flat].astype(np.float32) / 255.0) * 2.0 - 1.0
            block = block.view(rows.shape[0], n, width, channels)
            across[top:top + rows.shape[0], o:o + n] = torch.einsum("rosc,os->roc", block, wx[o:o + n])
    rows_index, wy = _axis_band(height, out_h)
    gathered = across[torch.from_numpy(rows_index)]  # out_h x width_y x out_w x C (width_y small: see below)
    return torch.einsum("osjc,os->ojc", gathered, torch.from_numpy(wy.astype(np.float32)))


def clip_resize(image: np.ndarray, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """What `_resize_with_antialiasing(numpy_to_pt(pil_to_numpy(image)) * 2 - 1, size)` returns, fast.

    `image` is uint8, height x width x channels (`np.asarray` of an RGB PIL image). Returns float32,
    1 x channels x size, in [-1, 1] like diffusers' (the caller maps it to [0, 1] as the pipeline does).
    The axis with the larger intermediate goes second: a tall image is resized along its rows first, so the
    intermediate has at most out x sqrt(pixels) values per channel, and the second pass's band is short.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected uint8 height x width x channels, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if height * size[1] <= width * size[0]:
        out = _resize_rows(image, size)
    else:  # tall: the same on the transpose
        out = _resize_rows(image.transpose(1, 0, 2), (size[1], size[0])).transpose(0, 1)
    return out.permute(2, 0, 1).unsqueeze(0).contiguous()
