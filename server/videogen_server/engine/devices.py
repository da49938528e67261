"""Device discovery (imports torch lazily: only when a model is actually loaded)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
