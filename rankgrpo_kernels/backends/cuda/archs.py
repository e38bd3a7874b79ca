"""The GPU architectures the CUDA extension is compiled for, and nvcc's flags for them.

Both builds use this list: ``setup.py``'s prebuilt extension always (a portable wheel), the JIT build when no GPU
is visible (torch would otherwise raise IndexError: no GPU to read an architecture from, no ``TORCH_CUDA_ARCH_LIST``).
``TORCH_CUDA_ARCH_LIST``, when set, wins: no flags come from here and torch builds what it names. An architecture
this nvcc cannot compile for is left out; the newest one kept is also embedded as PTX (its forward-compatible,
non-"a" form), which the driver compiles for newer GPUs.

No torch and no package imports: ``setup.py`` loads this file by path, before torch is known to be there.
"""

from __future__ import annotations

import os
import re
import subprocess

# sm_80 (A100), sm_90a (H100/H200), sm_100a (B200), sm_120 (RTX 50xx, RTX PRO 6000): (compute capability, suffix).
ARCHS = ((80, ""), (90, "a"), (100, "a"), (120, ""))
ARCH_LIST_ENV = "TORCH_CUDA_ARCH_LIST"


def nvcc_capabilities(nvcc: str) -> set[int]:
    """The compute capabilities ``nvcc --list-gpu-arch`` names (compute_90 stands for 90a as well)."""
    listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True, timeout=60).stdout
    return {int(m) for m in re.findall(r"compute_(\d+)", listing)}


def gencode_flags(capabilities: set[int]) -> list[str]:
    """nvcc's ``-gencode`` flags: a cubin for each of ``ARCHS`` in ``capabilities``, and PTX of the newest."""
    kept = [(cc, suffix) for cc, suffix in ARCHS if cc in capabilities]
    if not kept:
        raise RuntimeError(f"this nvcc compiles none of sm_{', sm_'.join(f'{c}{s}' for c, s in ARCHS)} "
                           f"(it lists compute capabilities {sorted(capabilities)}): install CUDA 12.8 or newer")
    flags = [f"-gencode=arch=compute_{cc}{suffix},code=sm_{cc}{suffix}" for cc, suffix in kept]
    newest = kept[-1][0]
    return [*flags, f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def arch_flags(nvcc: str, *, portable: bool, gpu_visible: bool = False, environ=os.environ) -> list[str]:
    """The architecture flags a build adds to nvcc's: none when ``TORCH_CUDA_ARCH_LIST`` is set, or for a build
    that is not ``portable`` (the JIT build) while a GPU is visible (torch compiles for that GPU); else
    ``gencode_flags`` of what ``nvcc`` supports."""
    if environ.get(ARCH_LIST_ENV) or (gpu_visible and not portable):
        return []
    return gencode_flags(nvcc_capabilities(nvcc))
