"""Device discovery (imports torch lazily: only when a model is actually loaded)."""
from __future__ import annotations

import functools
import sys
from typing import Optional


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_uuids() -> Optional[list[str]]:
    """The UUID of each CUDA device this process sees, by CUDA ordinal, as torch gives it (no "GPU-" or
    "MIG-" prefix: NvmlReader tries both); None until a model loaded torch (a scrape never imports it)
    or without CUDA. The ordinals follow CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, NVML's indices do
    not: the UUID joins the two."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
