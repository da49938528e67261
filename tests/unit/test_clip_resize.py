"""preprocess.clip_resize against diffusers' own `_resize_with_antialiasing`, on the CPU, no model needed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from diffusers.video_processor import VideoProcessor
from PIL import Image

from videogen_server.backends.svd import preprocess

SHAPES = [  # height x width
    (48, 64),  # smaller than 224: an upsampling, the blur's sigma at its floor
    (224, 224),  # the identity size
    (500, 223),  # one axis up, one down
    (576, 1024), (1024, 576),  # SVD's landscape and portrait sizes
    (1536, 2048),  # a photo (the blur: kernels of 13 and 19 taps)
    (8, 3000), (3000, 9), (2000, 9),  # long thin images: reflected borders, the transposed order
]


def _diffusers(image: Image.Image) -> torch.Tensor:
    vp = VideoProcessor(do_resize=True, vae_scale_factor=8)
    with torch.inference_mode():  # what the pipeline's _encode_image does before its feature extractor
        return _resize_with_antialiasing(vp.numpy_to_pt(vp.pil_to_numpy(image)) * 2.0 - 1.0, (224, 224))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_values_as_diffusers(shape):
    torch.set_num_threads(1)
    rng = np.random.default_rng(sum(shape))
    # noise on a gradient: every pixel matters, and the borders differ from the middle
    ramp = np.linspace(0, 160, shape[1])[None, :, None] + np.linspace(0, 60, shape[0])[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 96, (*shape, 3)), 0, 255).astype(np.uint8)
    expected = _diffusers(Image.fromarray(pixels))
    with torch.inference_mode():
        ours = preprocess.clip_resize(pixels)
    assert ours.shape == expected.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    # float32 sums in another order: ~1e-6 apart on [-1, 1], against 8e-3 between two 8-bit levels
    assert (ours - expected).abs().max().item() < 4e-6


def test_blur_cost_counts_the_kernels_diffusers_uses():
    """The cost that picks diffusers' code: its kernels' lengths, from the same formula (read back here)."""
    seen = {}
    import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion as svd

    real = svd._gaussian_blur2d

    def spy(inp, kernel_size, sigma):
        seen["ks"] = kernel_size
        return real(inp, kernel_size, sigma)

    for height, width in [(576, 1024), (3024, 4032), (8, 3000)]:
        svd._gaussian_blur2d = spy
        try:
            _diffusers(Image.new("RGB", (width, height)))
        finally:
            svd._gaussian_blur2d = real
        assert preprocess.blur_cost(height, width) == height * width * 3 * sum(seen["ks"])


def test_refuses_what_is_not_uint8_hwc():
    with pytest.raises(ValueError, match="uint8"):
        preprocess.clip_resize(np.zeros((10, 10, 3), np.float32))
