"""FP8 needs more than a compute capability: a product on the device decides, at load."""
from __future__ import annotations

import torch

from videogen_server.backends.svd import accel


def test_fp8_is_refused_by_name_where_its_product_fails(monkeypatch):
    """The capability check lets through GPUs whose cuBLAS has no row-wise FP8 product (sm_120 in torch
    2.10): there a 16x16 product fails at load. No such GPU here: _scaled_mm raises what cuBLAS does."""
    assert accel.fp8_supported(torch.device("cpu")) is None  # this torch's CPU product works

    def not_supported(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul(...)`")

    monkeypatch.setattr(torch, "_scaled_mm", not_supported)
    why = accel.fp8_supported(torch.device("cpu"))
    assert why is not None and "FP8 row-wise matrix product fails" in why and "NOT_SUPPORTED" in why
