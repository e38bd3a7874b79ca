"""Whether this torch takes the in-place ``out_dtype=`` GEMMs on the GPU (``gemms.native_out_dtype``; torch 2.8/2.9
refuse ``addmm(..., out_dtype=, out=)``), and whether ``ieee_fp32`` keeps TF32 out of an fp32 GEMM."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels.head import gemms

from .helpers import CUDA

pytestmark = pytest.mark.gpu


def test_torch_probe(record):
    result = dict(torch=torch.__version__, device=CUDA.type)
    for dtype in (torch.bfloat16, torch.float16):
        result[str(dtype).split(".")[-1]] = gemms.native_out_dtype(CUDA, dtype)
    result["native_addmm_out_dtype"] = result["bfloat16"]["addmm"] == "native"
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with gemms.ieee_fp32():
            result["precision_inside_ieee_fp32"] = torch.get_float32_matmul_precision()
        result["precision_after"] = torch.get_float32_matmul_precision()
        # The TF32 error of a 4096-deep fp32 GEMM, with and without ieee_fp32.
        a, b = torch.randn(1024, 4096, device=CUDA), torch.randn(4096, 1024, device=CUDA)
        exact = a.double() @ b.double()
        tf32 = (a @ b).double()
        ieee = gemms.mm_into(a, b, torch.empty(1024, 1024, device=CUDA)).double()
        result["fp32_gemm_rel_error"] = dict(tf32_global=((tf32 - exact).abs().max() / exact.abs().max()).item(),
                                             mm_into=((ieee - exact).abs().max() / exact.abs().max()).item())
    finally:
        torch.set_float32_matmul_precision(before)
    record(**result)
    assert result["precision_inside_ieee_fp32"] == "highest" and result["precision_after"] == "high"
