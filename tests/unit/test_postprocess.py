"""Decoded frames to uint8 on the device: byte for byte what diffusers' postprocessing gives."""
from __future__ import annotations

import numpy as np
import torch
from diffusers.video_processor import VideoProcessor

from videogen_server.backends.svd.backend import _to_uint8


def test_frames_to_uint8_equal_diffusers_postprocess_and_numpy_rounding():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 3, 40, 56, generator=g) * 2.4 - 1.2  # some values out of [-1, 1]: clamped
    # values at or next to x.5 after the float32 arithmetic (most land exactly on it): half to even in both
    ties = torch.tensor([(2 * (k + 0.5) / 255 - 1) for k in range(0, 255, 17)])
    frames[0, 0, 0, :ties.numel()] = ties
    processor = VideoProcessor(vae_scale_factor=8)
    expected = (processor.postprocess(frames, output_type="np") * 255).round().astype(np.uint8)
    ours = _to_uint8(frames, processor.config.do_normalize)
    assert ours.dtype == np.uint8 and ours.flags["C_CONTIGUOUS"] and ours.shape == (3, 40, 56, 3)
    np.testing.assert_array_equal(ours, expected)
    assert frames.min() < -1  # the input is left as it was (the work is done on a copy)


def test_frames_to_uint8_without_denormalising_match_numpy_rounding():
    frames = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # already in [0, 1]
    expected = (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_to_uint8(frames, denormalize=False), expected)
