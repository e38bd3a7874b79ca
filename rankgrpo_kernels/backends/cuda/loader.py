"""The CUDA extension behind ``backend="cuda"``: the one ``setup.py`` prebuilt (``rankgrpo_kernels.backends.cuda._C``)
or one compiled just in time from ``csrc/`` with ninja on first import and cached by torch
(``TORCH_EXTENSIONS_DIR``). ``load_extension`` raises ``BackendUnavailable`` (an ImportError) naming the fix when
neither is possible, a failed build included, so the registry refuses the backend instead of crashing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..protocol import BackendUnavailable

# The JIT build's sources: rankgrpo_kernels/csrc/ in an installed wheel (setup.py copies them there), else the
# source checkout's csrc/ (an editable install or a plain checkout on sys.path).
PACKAGE = Path(__file__).resolve().parents[2]
CSRC_CANDIDATES = (PACKAGE / "csrc", PACKAGE.parent / "csrc")


def find_csrc(candidates=CSRC_CANDIDATES) -> Path:
    """The first candidate holding ``binding.cpp``; the first candidate (where a wheel puts them) if none does."""
    return next((path for path in candidates if (path / "binding.cpp").is_file()), candidates[0])


CSRC = find_csrc()


def load_extension():
    try:
        from . import _C  # built by setup.py on machines with nvcc and a CUDA torch

        return _C
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise BackendUnavailable(
            "backend='cuda' needs a CUDA build of torch (this one is CPU-only: torch.version.cuda is None); "
            "install torch from the CUDA wheel index, or use backend='triton' or 'torch'")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise BackendUnavailable(
            f"backend='cuda' compiles csrc/ on first use and needs the CUDA toolkit (nvcc) matching torch's CUDA "
            f"{torch.version.cuda}: install it and set CUDA_HOME, or use backend='triton' or 'torch'")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("backend='cuda' compiles csrc/ just in time with ninja: pip install ninja")
    sources = sorted(CSRC.glob("*.cu"))
    if not (CSRC / "binding.cpp").is_file() or not sources:
        raise BackendUnavailable(
            f"backend='cuda' compiles {CSRC} just in time, but it is not there (an install without the sources); "
            "run pip install --no-build-isolation . from the repository on a machine with nvcc to prebuild it")
    try:
        return cpp_extension.load(name="rankgrpo_kernels_cuda",
                                  sources=[str(CSRC / "binding.cpp"), *map(str, sources)],
                                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
    except (RuntimeError, OSError, IndexError) as exc:  # compile/link error, no GPU and no arch list, ...
        raise BackendUnavailable(f"backend='cuda': building csrc/ failed ({exc}); use backend='triton' or "
                                 "'torch'") from exc
