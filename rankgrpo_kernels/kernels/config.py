"""Fixed tile configurations per GPU generation, in one dataclass (no autotuning: results stay reproducible).

Hopper (sm_90) and Ampere (sm_80) share tiles of 128 tokens x 64 vocabulary rows x 64 hidden, 8 warps: the fp32
logits tile plus its softmax temporaries then fit in registers without spills, which a test checks on the
compiled cubins. Under ``TRITON_INTERPRET=1`` (CPU) small tiles keep the numpy interpreter fast.
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
    max_splits: int = 64  # vocabulary splits of the forward (partials kept: splits x N x 4 floats)


HOPPER = KernelConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3)
AMPERE = KernelConfig(block_n=128, block_v=64, block_h=64, num_warps=8, num_stages=3)
INTERPRETER = KernelConfig(block_n=16, block_v=32, block_h=16, num_warps=4, num_stages=1, max_splits=4)
CONFIGS = {"sm_90": HOPPER, "sm_80": AMPERE}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forward_config(device: torch.device, dtype: torch.dtype) -> KernelConfig:
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    major, _ = torch.cuda.get_device_capability(device)
    return HOPPER if major >= 9 else AMPERE


backward_config = forward_config


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would cost 3 decimal digits of the log-probs); "interpret" makes
    ``dot`` upcast its operands, since the Triton 3.9 interpreter multiplies bf16 operands wrongly."""
    if interpreting():
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"
