"""Fixed tile configurations per GPU generation and input precision, in one dataclass (no autotuning, so results
stay reproducible). Each was chosen as the largest tile whose compiled sm_90a and sm_80 code keeps every value in
registers (``tests/test_triton_aot.py`` fails on any spill):

===========  =====================  ==========================  ==========================
inputs       products               forward (N x V x H, warps)  backward (N x V x H, warps)
===========  =====================  ==========================  ==========================
bf16, fp16   native, fp32 accum.    128 x 64 x 32, 8            128 x 64 x 32, 8
fp32         3xTF32 (~fp32 exact)   64 x 64 x 16, 4             32 x 32 x 32, 4
===========  =====================  ==========================  ==========================

Hopper and Ampere share them today. Under ``TRITON_INTERPRET=1`` (CPU) small tiles keep the numpy interpreter fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary rows per tile
    block_h: int  # hidden features per GEMM step
    num_warps: int = 8
    num_stages: int = 3
    max_splits: int = 64  # vocabulary splits of the forward (partials kept: 4 x splits x N floats)


HALF_FORWARD = HALF_BACKWARD = KernelConfig(block_n=128, block_v=64, block_h=32, num_warps=8, num_stages=3)
FP32_FORWARD = KernelConfig(block_n=64, block_v=64, block_h=16, num_warps=4, num_stages=2)
FP32_BACKWARD = KernelConfig(block_n=32, block_v=32, block_h=32, num_warps=4, num_stages=2)
INTERPRETER = KernelConfig(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=1, max_splits=4)
# (architecture, input dtype) -> (forward, backward); sm_90 and sm_80 share the tiles for now.
CONFIGS = {
    (arch, dtype): (FP32_FORWARD, FP32_BACKWARD) if dtype == torch.float32 else (HALF_FORWARD, HALF_BACKWARD)
    for arch in ("sm_90", "sm_80")
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(device: torch.device, dtype: torch.dtype) -> tuple[KernelConfig, KernelConfig]:
    if interpreting() or device.type != "cuda":
        return INTERPRETER, INTERPRETER
    arch = "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"
    return CONFIGS[(arch, dtype)]


def forward_config(device: torch.device, dtype: torch.dtype) -> KernelConfig:
    return _configs(device, dtype)[0]


def backward_config(device: torch.device, dtype: torch.dtype) -> KernelConfig:
    return _configs(device, dtype)[1]


def dot_precision(dtype: torch.dtype) -> str:
    """The products of ``dot``: fp32 inputs take 3xTF32 on the matrix units (plain TF32 would cost 3 decimal digits
    of the log-probs); "interpret" makes ``dot`` upcast its operands, since the Triton 3.9 interpreter multiplies
    bf16 operands wrongly."""
    if interpreting():
        return "interpret"
    return "tf32x3" if dtype == torch.float32 else "tf32"
