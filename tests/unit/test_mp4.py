"""The fragmented MP4's timeline: what a player shows when."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

from videogen_server.media.mp4 import FragmentedMP4Encoder


@pytest.mark.parametrize("frames,fps", [(1, 7), (2, 7), (3, 7), (8, 7), (25, 7), (14, 1), (16, 30)])
def test_the_video_starts_at_zero_and_lasts_frames_over_fps(frames, fps):
    """x264 emits B-frames, so its first packet decodes 2 frames before it is shown; with the header
    written ahead of any packet (empty_moov) the muxer could not say so with an edit list and shifted
    the whole video by 2 frames instead (starting at 0.29 s at 7 fps, 2 s at 1 fps, lasting a frame
    longer than it should). Frames in a chunk of 8, as the server feeds them."""
    rng = np.random.default_rng(frames)
    video = rng.integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8)  # busy frames: B-frames are used
    enc = FragmentedMP4Encoder(width=64, height=48, fps=fps)
    data = b"".join(enc.add(video[i:i + 8]) for i in range(0, frames, 8)) + enc.finish()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        times = [float(f.time) for f in container.decode(stream)]
    assert len(times) == frames
    np.testing.assert_allclose(times, np.arange(frames) / fps, atol=1e-3)
    with av.open(io.BytesIO(data)) as container:
        assert abs(container.duration / av.time_base - frames / fps) < 1e-3
