"""Environment knobs, read in one place. Every name starts with ``RANKGRPO_``.

RANKGRPO_MEMORY_BUDGET  bytes of logits scratch one fused call may hold at once (default: 128 MiB on a CPU,
                        1.5 GiB on a GPU, see ``DEFAULT_MEMORY_BUDGET``)
RANKGRPO_VALIDATE       "0" skips the value checks that need a host sync (NaN, target ids in range); shape,
                        dtype and device checks always run
"""

from __future__ import annotations

import os

import torch

# The logits chunk is the only scratch that grows with the vocabulary. On a GPU, 1.5 GiB holds the fp32 logits of
# 2.6k tokens of a 152k vocabulary (Qwen2.5) and 3.1k of a 128k one (Llama-3): GEMMs of that height run near the
# tensor-core peak, and it is about 5% of what eager holds at 16k tokens (bf16 logits, their fp32 copy, log_softmax
# and its gradient: 30-40 GB). On a CPU, 128 MiB keeps a 512-token row of a 32k vocabulary in one chunk (GEMMs of
# 512 rows already run at the BLAS peak) and the extra memory under 10% of eager's.
DEFAULT_MEMORY_BUDGET = {"cuda": 3 * 2**29, "cpu": 2**27}
MIN_MEMORY_BUDGET = 2**16


def memory_budget(override: int | None, device: torch.device) -> int:
    """The logits scratch budget in bytes: ``override`` if given, else the environment, else the device default."""
    if override is not None:
        value = override
    elif "RANKGRPO_MEMORY_BUDGET" in os.environ:
        value = int(os.environ["RANKGRPO_MEMORY_BUDGET"])
    else:
        value = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MEMORY_BUDGET:
        raise ValueError(f"memory_budget_bytes (or RANKGRPO_MEMORY_BUDGET) must be an int >= {MIN_MEMORY_BUDGET}, "
                         f"got {value!r}")
    return value


def validate_values() -> bool:
    return os.environ.get("RANKGRPO_VALIDATE", "1") != "0"
