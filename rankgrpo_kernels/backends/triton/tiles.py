"""Fixed launch settings of the Triton kernels, in one dataclass per kernel (no autotuning, so results stay
reproducible). Each was chosen from the compiled sm_90a and sm_80 code: every value stays in registers
(``tests/backends/test_triton_aot.py`` fails on any spill).

The row pass (``row_pass_kernel.py``: one program per row of fp32 logits, no matrix units; the GEMMs are cuBLAS's) has
an entry per gradient dtype, ``RowPassConfig``: rows up to ``single_block`` = 16384 columns are held whole in registers
by 32 warps (16 floats a thread, at most 64 registers: one 1024-thread program per SM), longer rows are walked 2048
columns at a time by 8 warps (30-100 registers by variant and architecture: several programs per SM hide the latency
of the loads; 16 warps for fp32 gradients on Hopper, where 8 spilled in one variant). Hopper and Ampere share the
others. With a softcap the slope S'(u) is held next to each probability, so rows are held whole up to 8192 columns
(16 floats a thread again). Under ``TRITON_INTERPRET=1`` (CPU) wide blocks keep the numpy interpreter fast.

On ROCm (``torch.version.hip``) a warp is a 64-lane wavefront and a work-group holds at most 1024 work-items (MI300):
32 warps would be 2048, which fails to launch, so ``ROW_PASS_ROCM`` holds the same 16 floats a thread in 16
wavefronts (``work_items`` checks every configuration against its platform's limit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RowPassConfig:
    single_block: int  # longest row held whole in registers (read once); a power of two
    single_warps: int  # warps of a program holding ``single_block`` columns (fewer for shorter rows)
    block_v: int  # columns per step of the two-pass walk of longer rows
    num_warps: int = 8  # warps of the two-pass walk
    softcap_single_block: int | None = None  # the same with a softcap (S'(u) is held next to p): single_block / 2

    def single_limit(self, softcap: bool) -> int:
        """Longest row held whole in registers, with or without a softcap."""
        if not softcap:
            return self.single_block
        return self.softcap_single_block if self.softcap_single_block is not None else self.single_block // 2


# Keyed by the dtype of the gradient written (None: no gradient); sm_90 and sm_80 share them but for fp32 gradients on
# Hopper, whose two-pass walk with a softcap on unaligned rows spills 4 bytes at 8 warps (64 registers, with Triton's
# ptxas flags): 16 warps hold 4 floats a thread of the same 2048 columns in about 40.
ROW_PASS = RowPassConfig(single_block=16384, single_warps=32, block_v=2048, num_warps=8)
ROW_PASS_HOPPER_FP32 = RowPassConfig(single_block=16384, single_warps=32, block_v=2048, num_warps=16)
# 16 wavefronts of 64 lanes: 1024 work-items, the most a ROCm work-group holds; the same floats a thread as above.
ROW_PASS_ROCM = RowPassConfig(single_block=16384, single_warps=16, block_v=2048, num_warps=8)
MAX_WORK_ITEMS = 1024  # per program (CUDA thread block, ROCm work-group)
# The interpreter runs programs one by one in numpy: blocks as wide as the tests' rows keep it fast.
ROW_PASS_INTERPRETER = RowPassConfig(single_block=4096, single_warps=4, block_v=1024, num_warps=4)
ROW_PASS_CONFIGS = {
    (arch, grad_dtype): ROW_PASS_HOPPER_FP32 if (arch, grad_dtype) == ("sm_90", torch.float32) else ROW_PASS
    for arch in ("sm_90", "sm_80")
    for grad_dtype in (None, torch.float32, torch.bfloat16, torch.float16)
}


def rocm() -> bool:
    return torch.version.hip is not None


def work_items(warps: int) -> int:
    """Work-items of a program of ``warps`` warps here: 32 lanes a warp on CUDA, 64 a wavefront on ROCm."""
    return warps * (64 if rocm() else 32)


def row_pass_config(device: torch.device, grad_dtype: torch.dtype | None) -> RowPassConfig:
    if interpreting() or device.type != "cuda":
        return ROW_PASS_INTERPRETER
    if rocm():
        return ROW_PASS_ROCM
    arch = "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"
    return ROW_PASS_CONFIGS[(arch, grad_dtype)]
