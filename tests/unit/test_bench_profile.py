"""bench.py --profile's kernel kinds, on kernel names CUPTI reported on an H200 (docs/perf/2026-11-26-h200-run4-*)."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")


@functools.cache
def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "bench.py"
    spec = importlib.util.spec_from_file_location("videogen_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, kind", [
    # Inductor's kernels are named after the ops fused into them: they are Inductor's, not the library's
    ("triton_red_fused_add_clone_convolution_div_native_group_norm_permute_silu_unsqueeze_75", "triton"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_clone_5", "triton"),
    ("triton_red_fused__scaled_mm__to_copy_abs_add_amax_clamp_div_gelu_mul_split_t_view_32", "triton"),
    # max-autotune's templates: GEMMs and convolutions, not glue
    ("triton_tem_fused_addmm_gelu_mul_12", "gemm_triton"),
    ("triton_tem_fused__scaled_mm_3", "gemm_triton"),
    ("triton_tem_fused_convolution_7", "conv_triton"),
    ("triton_tem_fused_add_convolution_4", "conv_triton"),  # Inductor sorts the fused ops' names
    ("triton_tem_fused__to_copy_convolution_2", "conv_triton"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", "gemm_fp8"),
    ("nvjet_sm90_hsh_512x8_64x3_4x1_v_bz_TNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>", "attention"),
    # FlashAttention-4 (CuTe DSL): the kernel's name carries its class (not a CUTLASS GEMM)
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensorptrf16gmem_0",
     "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x128x64_warpgroupsize2x1x1_g1",
     "conv"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "layout"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Half)", "norm"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<CUDAFunctor_add>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert _bench().kernel_kind(name) == kind
