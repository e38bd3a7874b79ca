"""The CUDA extension behind ``backend="cuda"``: the one ``setup.py`` prebuilt (``rankgrpo_kernels.backends.cuda._C``),
else one built just in time from ``csrc/`` (``build.py``: in a child process under a time limit, cached under
``TORCH_EXTENSIONS_DIR``). ``load_extension`` raises ``BackendUnavailable`` (an ImportError) naming the fix when
neither is possible, a failed or timed-out build included (with the end of its log), so the registry refuses the
backend instead of crashing or hanging. On ROCm it refuses by name before looking for either (``unsupported_platform``:
the kernels assume 32-lane warps).

``RANKGRPO_CUDA_JIT=0`` loads only a prebuilt or already-built extension and otherwise refuses with "not built yet";
the test suite sets it, so that collecting tests never compiles (a GPU run builds first: ``python -m
rankgrpo_kernels.backends.cuda.build``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from ..protocol import BackendUnavailable

# The JIT build's sources: rankgrpo_kernels/csrc/ in an installed wheel (setup.py copies them there), else the
# source checkout's csrc/ (an editable install or a plain checkout on sys.path).
PACKAGE = Path(__file__).resolve().parents[2]
CSRC_CANDIDATES = (PACKAGE / "csrc", PACKAGE.parent / "csrc")
JIT_ENV = "RANKGRPO_CUDA_JIT"


def find_csrc(candidates=CSRC_CANDIDATES) -> Path:
    """The first candidate holding ``binding.cpp``; the first candidate (where a wheel puts them) if none does."""
    return next((path for path in candidates if (path / "binding.cpp").is_file()), candidates[0])


CSRC = find_csrc()


def unsupported_platform() -> str | None:
    """Why no build of csrc/ can run here (None if one can): ROCm, whose 64-lane wavefronts the kernels' 32-lane warp
    sums and masks do not fit."""
    if torch.version.hip is not None:
        return (f"backend='cuda' is unavailable on ROCm (torch.version.hip = {torch.version.hip}): csrc/ assumes "
                "32-lane warps (warp shuffles and full masks), AMD GPUs run 64-lane wavefronts; use backend='triton' "
                "or 'torch'")
    return None


def missing_prerequisite() -> str | None:
    """Why the JIT build cannot run here (None if it can): a CPU-only torch, no nvcc, no ninja, no sources."""
    if torch.version.cuda is None:
        return ("backend='cuda' needs a CUDA build of torch (this one is CPU-only: torch.version.cuda is None); "
                "install torch from the CUDA wheel index, or use backend='triton' or 'torch'")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return (f"backend='cuda' compiles csrc/ on first use and needs the CUDA toolkit (nvcc) matching torch's CUDA "
                f"{torch.version.cuda}: install it and set CUDA_HOME, or use backend='triton' or 'torch'")
    if not cpp_extension.is_ninja_available():
        return "backend='cuda' compiles csrc/ just in time with ninja: pip install ninja"
    if not (CSRC / "binding.cpp").is_file() or not any(CSRC.glob("*.cu")):
        return (f"backend='cuda' compiles {CSRC} just in time, but it is not there (an install without the sources); "
                "run pip install --no-build-isolation . from the repository on a machine with nvcc to prebuild it")
    return None


def load_extension(jit: bool | None = None):
    """The prebuilt extension, else the one built from these sources before, else (``jit``: by default unless
    ``RANKGRPO_CUDA_JIT=0``) one built now under the time limit. Refused on ROCm before any of them."""
    unsupported = unsupported_platform()
    if unsupported is not None:
        raise BackendUnavailable(unsupported)
    try:
        from . import _C  # built by setup.py on machines with nvcc and a CUDA torch

        return _C
    except ImportError:
        pass
    reason = missing_prerequisite()
    if reason is not None:
        raise BackendUnavailable(reason)
    from . import build

    try:
        spec = build.spec(CSRC)
        if build.built(spec) is None:
            if not (jit if jit is not None else os.environ.get(JIT_ENV, "1") != "0"):
                raise BackendUnavailable(
                    f"backend='cuda': the CUDA extension is not built yet: run `{build.ENTRY}` ({JIT_ENV}=0 here: "
                    "no build on import), or use backend='triton' or 'torch'")
            build.build(spec)
        return build.import_built(spec)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # nvcc's arch list, a broken module file, ...
        raise BackendUnavailable(f"backend='cuda': loading the extension built from csrc/ failed ({exc}); rebuild "
                                 f"it with `{build.ENTRY}`, or use backend='triton' or 'torch'") from exc

