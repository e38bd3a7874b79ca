"""Build script. Metadata lives in pyproject.toml.

The optional CUDA extension ``rankgrpo_kernels.backends.cuda._C`` (``csrc/``: the kernels of ``backend="cuda"``) is
built only when torch is importable at build time, is a CUDA build, and a CUDA toolchain (nvcc under ``CUDA_HOME``)
is found. pip's build isolation hides the installed torch, so prebuilding takes ``pip install --no-build-isolation
.``; every other install is the plain pure-Python one, and ``backend="cuda"`` then compiles ``csrc/`` just in time
on first use. ``RANKGRPO_BUILD_CUDA=0`` skips the extension, ``RANKGRPO_BUILD_CUDA=1`` makes a missing prerequisite
an error. The extension is compiled for every architecture of ``rankgrpo_kernels/backends/cuda/archs.py`` this nvcc
supports (sm_80, sm_90a, sm_100a, sm_120 and PTX of the newest: a portable wheel, built with or without a GPU), unless
``TORCH_CUDA_ARCH_LIST`` names others; that file is loaded by path (the package itself needs torch at import).

The sources of that JIT build travel in every wheel: ``build_py`` copies ``csrc/*.cu, *.cuh, *.h, *.cpp`` into
``rankgrpo_kernels/csrc/`` of the build (the repository's top-level ``csrc/`` stays the only copy in git), where
``backends/cuda/loader.py`` looks first. The sdist carries ``csrc/`` through MANIFEST.in.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path("csrc")
CSRC_PATTERNS = ("*.cu", "*.cuh", "*.h", "*.cpp")


def csrc_files() -> list[Path]:
    return sorted(path for pattern in CSRC_PATTERNS for path in CSRC.glob(pattern))


class BuildPyWithSources(build_py):
    """build_py, plus the CUDA sources as package data under rankgrpo_kernels/csrc/ (for the JIT build)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "rankgrpo_kernels" / "csrc"
        self.mkpath(str(target))
        for source in csrc_files():
            self.copy_file(str(source), str(target / source.name))

    def get_outputs(self, include_bytecode=True):
        target = Path(self.build_lib) / "rankgrpo_kernels" / "csrc"
        return [*super().get_outputs(include_bytecode), *(str(target / p.name) for p in csrc_files())]


def load_archs():
    """``rankgrpo_kernels/backends/cuda/archs.py`` as a module of its own, without importing the package."""
    path = Path(__file__).resolve().parent / "rankgrpo_kernels" / "backends" / "cuda" / "archs.py"
    spec = importlib.util.spec_from_file_location("rankgrpo_cuda_archs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_build_options() -> dict:
    """``setup()`` keywords that build the extension, or {} (with the reason printed) when it cannot be built."""
    mode = os.environ.get("RANKGRPO_BUILD_CUDA", "auto")
    if mode == "0":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        missing = "torch is not importable at build time (pip's build isolation hides it: --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            missing = "this torch is a CPU-only build"
        elif cpp_extension.CUDA_HOME is None:
            missing = "no CUDA toolkit found (install nvcc and set CUDA_HOME)"
        else:
            sources = [str(CSRC / "binding.cpp"), *map(str, sorted(CSRC.glob("*.cu")))]
            nvcc = str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
            nvcc_flags = ["-O3", *load_archs().arch_flags(nvcc, portable=True)]
            extension = cpp_extension.CUDAExtension("rankgrpo_kernels.backends.cuda._C", sources,
                                                    extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags})
            return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}
    if mode == "1":
        raise RuntimeError(f"RANKGRPO_BUILD_CUDA=1 but the CUDA extension cannot be built: {missing}")
    print(f"rankgrpo-kernels: installing without the CUDA extension ({missing}); backend='cuda' builds it on first use")
    return {}


options = cuda_build_options()
options["cmdclass"] = {**options.get("cmdclass", {}), "build_py": BuildPyWithSources}
setup(**options)
