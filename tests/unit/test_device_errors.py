"""Which device errors are memory pressure (the request fails or re-runs alone, the instance serves on)
and which leave the device unusable (the instance is retired). The texts are CUDA's and torch's own;
there is no GPU here to raise them."""
from __future__ import annotations

import pytest
import torch

from videogen_server.backends.base import is_fatal_device_error, is_out_of_memory


@pytest.mark.parametrize("exc, oom, fatal", [
    (torch.OutOfMemoryError("injected oom at step 2"), True, False),  # by type, whatever its text
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, False),
    (RuntimeError("CUDA error: out of memory"), True, False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True, False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True, False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False, True),
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), False, True),
    # a compiled (Triton) kernel meets the lost device first under torch.compile; the driver and cuDNN
    (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), False, True),
    (RuntimeError("CUDA driver error: unspecified launch failure"), False, True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), False, True),
    # a request's own launch errors: the device works on
    (RuntimeError("CUDA error: invalid configuration argument"), False, False),
    (RuntimeError("CUDA error: too many resources requested for launch"), False, False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul( ...)`"), False, False),
    (RuntimeError("shape mismatch"), False, False),
    (ValueError("bad image"), False, False),
])
def test_memory_pressure_and_lost_devices_apart(exc, oom, fatal):
    assert is_out_of_memory(exc) is oom
    assert is_fatal_device_error(exc) is fatal
