"""Environment knobs, read in one place. Every name starts with ``RANKGRPO_``.

RANKGRPO_MEMORY_BUDGET  bytes of logits scratch one fused call may hold at once (default: 64 MiB on a CPU; on
                        a GPU 1/32 of its memory within [512 MiB, 4 GiB], see ``gpu_memory_budget``)
RANKGRPO_VALIDATE       "0" skips the value checks that need a host sync (NaN, target ids in range); shape,
                        dtype and device checks always run
"""

from __future__ import annotations

import os

import torch

# The logits chunk is the only scratch that grows with the vocabulary. Per token of a chunk it holds an fp32 logits
# row (plus its bf16 gradient where a backend cannot write it in place) and two H-wide rows: 0.6 MB for a 152k
# vocabulary (Qwen2.5), 0.5 MB for a 128k one (Llama-3). On a CPU, 64 MiB is a chunk of ~500 tokens of a 32k
# vocabulary (GEMMs of 512 rows already run at the BLAS peak), so the extra memory (budget plus gradients) stays
# under 10% of eager's at 4k tokens; chunks hold whole items, not rows, so a long completion needs no more.
#
# On a GPU the budget sets the height C of the chunk GEMMs (C x H by H x V, then their gradients): cuBLAS reaches
# its large-GEMM efficiency (70-80% of the tensor-core peak) from a few thousand rows, lower below ~1k rows (wave
# quantisation), and gains nothing past ~4k while each chunk's memory is taken from the activations of the model
# around it. So the default is a fraction of the device's memory, clamped: 1/32 gives 4 GiB on an H200 (141 GB;
# ~7k tokens of Qwen's head) or an H100/A100 of 80 GB (2.5 GiB, ~4k tokens), 1.25 GiB on a 40 GB A100 and the
# 512 MiB floor (~900 tokens) on cards of 16 GB and less. Eager holds 30-40 GB of logits and their copies at 16k
# tokens; the budget stays far below that everywhere.
DEFAULT_MEMORY_BUDGET = {"cuda": 3 * 2**29, "cpu": 2**26}  # cuda: used only where the device cannot be queried
GPU_MEMORY_FRACTION = 1 / 32
GPU_MEMORY_BUDGET_RANGE = (2**29, 2**32)  # [512 MiB, 4 GiB]
MIN_MEMORY_BUDGET = 2**16


def gpu_memory_budget(device: torch.device) -> int:
    """The default budget of a CUDA device: ``GPU_MEMORY_FRACTION`` of its memory, clamped to
    ``GPU_MEMORY_BUDGET_RANGE``, in whole MiB. Host-side (device properties), no sync."""
    try:
        total = torch.cuda.get_device_properties(device).total_memory
    except (RuntimeError, AssertionError, AttributeError):  # no CUDA here (a fake or meta device in a trace)
        return DEFAULT_MEMORY_BUDGET["cuda"]
    low, high = GPU_MEMORY_BUDGET_RANGE
    return min(high, max(low, int(total * GPU_MEMORY_FRACTION))) // 2**20 * 2**20


def memory_budget(override: int | None, device: torch.device) -> int:
    """The logits scratch budget in bytes: ``override`` if given, else the environment, else the device default."""
    if override is not None:
        value = override
    elif "RANKGRPO_MEMORY_BUDGET" in os.environ:
        value = int(os.environ["RANKGRPO_MEMORY_BUDGET"])
    elif device.type == "cuda":
        value = gpu_memory_budget(device)
    else:
        value = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory_budget_bytes (or RANKGRPO_MEMORY_BUDGET) must be an int >= {MIN_MEMORY_BUDGET}, "
                         f"got {value!r}")
    return value


def validate_values() -> bool:
    return os.environ.get("RANKGRPO_VALIDATE", "1") != "0"
