"""The Stable Video Diffusion backend (diffusers' StableVideoDiffusionPipeline).

Importing the package does no heavy work: `backend` imports torch and diffusers.
"""
from __future__ import annotations

import logging


class _NoTorchvisionNotice(logging.Filter):
    """transformers 5 names its torchvision image processors `CLIPImageProcessor`; without torchvision
    (which this server does not install: PyPI's build fails to import beside the CPU torch) it hands
    out the PIL one under that name, the class earlier transformers had, with a WARNING at every
    start asking to install torchvision. The backend uses it for CLIP's normalisation only, the PIL
    class's job, so the warning said nothing an operator should act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


# (transformers' logger for its lazy imports; the filter runs before diffusers imports transformers)
logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
