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


def test_the_probe_holds_while_another_thread_instantiates_a_model():
    """diffusers' from_pretrained builds its model under accelerate's empty-weights init and torch's
    default dtype set to the model's: both process-wide, so a probe another instance ran meanwhile got
    meta weights and refused FP8 (seen in CI, with eight models loading at once). This is what that
    thread does for the length of an instantiation, here around the probe."""
    import accelerate
    before = torch.get_default_dtype()
    try:
        with accelerate.init_empty_weights():
            torch.set_default_dtype(torch.float16)
            assert accel.fp8_supported(torch.device("cpu")) is None
            static = accel.Fp8Linear(torch.nn.Linear(16, 16, device="cpu", dtype=torch.float32), static=True)
            assert static.input_amax.dtype == torch.float32 and static.input_scale.dtype == torch.float32
    finally:
        torch.set_default_dtype(before)
