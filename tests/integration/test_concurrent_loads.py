"""What another model's load does to the process does not reach the requests served beside it.

diffusers' and transformers' from_pretrained set torch's default dtype to the model's own for the length
of an instantiation, process-wide (torch has no per-thread default). A float16 model loading (a reload,
a second model, a repository-API load) so changed what a request in flight computed: its CLIP resize
failed outright on a large image ("expected scalar type Float but found Half"), and its timesteps came
out in float16, other frames than its seed makes.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .test_accel import _frames
from ..helpers import ServerThread, tiny_config


def _photo() -> bytes:
    # large enough (1.5 MP) for the CLIP resize's sampled path (preprocess.clip_resize), as a photo takes
    y, x = np.mgrid[0:1000, 0:1500]
    pixels = np.stack([x * 255 // 1500, y * 255 // 1000, (x + y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_float16_load_elsewhere_leaves_a_requests_frames_as_its_seed_makes_them(make_repo):
    """The load (another backend's: this one's own loads are float32 now, see the next test) is played by
    what it does for that length, torch.set_default_dtype(float16), held over the whole request here (a
    real load's window is shorter and timing-dependent)."""
    repo = make_repo({"plain": tiny_config("plain")})
    # ten steps with a guidance ramp: float16 timesteps and guidance scales change ~100 of these values
    case = dict(seed=2, num_frames=4, num_inference_steps=10, decode_chunk_size=4, min_guidance_scale=1.0,
                max_guidance_scale=3.0, image=_photo())
    with ServerThread(repo) as server:
        expected = _frames(server, "plain", **case)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            during = _frames(server, "plain", **case)
        finally:
            torch.set_default_dtype(before)
    assert np.array_equal(during, expected)


def test_loading_a_float16_model_leaves_torchs_default_dtype_alone(tiny_model_source, monkeypatch):
    """from_pretrained(dtype=float16) sets the process's default dtype to float16 while it builds each
    model. Compiled graphs are guarded on the default dtype, so an instance serving beside such a load
    compiled again inside a request, and a compile spanning the window left float16 as the default for
    good (both reproduced with torch's Dynamo on CPU). A float16 instance now loads in float32 and casts:
    the default never changes, and the weights are the same bits as a float16 load's."""
    from diffusers import StableVideoDiffusionPipeline

    from videogen_server.backends.base import InstanceContext
    from videogen_server.backends.svd.backend import SVDBackend

    defaults = []
    real = torch.set_default_dtype
    monkeypatch.setattr(torch, "set_default_dtype", lambda d: (defaults.append(d), real(d)))
    backend = SVDBackend()
    backend.initialize(InstanceContext("svd-tiny", 1, tiny_model_source / "1", {"dtype": "float16"}, "cpu", 0, 1,
                                       cpu_threads=1))
    monkeypatch.undo()
    assert set(defaults) <= {torch.float32}, defaults
    direct = StableVideoDiffusionPipeline.from_pretrained(str(tiny_model_source / "1"), dtype=torch.float16,
                                                          use_safetensors=True)
    try:
        for name in ("unet", "vae", "image_encoder"):
            ours, theirs = getattr(backend.pipe, name).state_dict(), getattr(direct, name).state_dict()
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), f"{name}.{key}"
    finally:
        backend.finalize()
