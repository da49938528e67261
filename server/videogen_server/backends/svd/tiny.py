"""A tiny, randomly initialised Stable Video Diffusion of diffusers' real classes.

Same classes, same code paths, same on-disk format as `stabilityai/stable-video-diffusion-img2vid-xt`,
at sizes that run in well under a second per video on one CPU core. Tests and the demo build it with
`save_pretrained` and load it back with `from_pretrained`, exactly as a real checkpoint is loaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                       UNetSpatioTemporalConditionModel)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_NUM_FRAMES = 4

TINY_CONFIG = """\
# A tiny random Stable Video Diffusion, for tests and the demo (written by `videogen-server make-tiny-model`).
name: "{name}"
backend: "svd"
max_batch_size: 2
version_policy: {{ latest: {{ num_versions: 1 }} }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
dynamic_batching {{
  max_queue_delay_microseconds: 0
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {{ max_queue_size: 16 }}
}}
parameters {{ key: "dtype" value {{ string_value: "float32" }} }}
parameters {{ key: "default_width" value {{ string_value: "64" }} }}
parameters {{ key: "default_height" value {{ string_value: "48" }} }}
parameters {{ key: "default_num_inference_steps" value {{ string_value: "4" }} }}
parameters {{ key: "default_decode_chunk_size" value {{ string_value: "2" }} }}
parameters {{ key: "min_width" value {{ string_value: "16" }} }}
parameters {{ key: "min_height" value {{ string_value: "16" }} }}
parameters {{ key: "max_width" value {{ string_value: "256" }} }}
parameters {{ key: "max_height" value {{ string_value: "256" }} }}
parameters {{ key: "max_num_frames" value {{ string_value: "16" }} }}
parameters {{ key: "max_num_inference_steps" value {{ string_value: "50" }} }}
model_warmup [ {{ name: "tiny", inputs {{ key: "num_inference_steps" value: "1" }} }} ]
"""


def build_tiny_pipeline(seed: int = 0) -> StableVideoDiffusionPipeline:
    """The tiny pipeline, deterministic for a given seed."""
    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, num_frames=TINY_NUM_FRAMES, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
        transformer_layers_per_block=1, addition_time_embed_dim=32, projection_class_embeddings_input_dim=96)
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
    # The pipeline always resizes the image to 224x224 for CLIP, so the encoder must take 224.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=224, patch_size=32))
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    # SVD-XT's scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=feature_extractor)


def write_tiny_repository(repository: Path, *, name: str = "svd-tiny", version: int = 1, seed: int = 0) -> Path:
    """Write `<repository>/<name>/config.pbtxt` and the weights under `<name>/<version>/`. Returns the model dir."""
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(str(version_dir), safe_serialization=True)
    (model_dir / "config.pbtxt").write_text(TINY_CONFIG.format(name=name))
    return model_dir
