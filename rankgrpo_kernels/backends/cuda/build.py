"""The CUDA extension's just-in-time build: under a time limit, in a child process, and found again once built.

    python -m rankgrpo_kernels.backends.cuda.build    # build it now (a GPU run's first phase), print where

The child runs torch's ``cpp_extension.load`` (ninja, nvcc) in its own session and is killed after
``RANKGRPO_CUDA_BUILD_TIMEOUT`` seconds (default 300): a hung compiler makes the backend refuse, with the end of the
build log, instead of hanging whoever imported it. torch serialises builds of a directory with a lock file
(``FileBaton``'s ``lock``) that a killed build leaves behind and every later build then waits on forever: the lock of
a build killed here is removed, and so is, before a build, a lock older than the time limit (no build started here
lives that long). A build that failed is not retried in the same process.

The extension's name carries a hash of the sources, the flags and the torch, CUDA and Python versions, so that its
build directory holds one version and "built" is a file test (the module next to the ``built`` stamp the child
writes once the extension imported): loading a built extension runs no compiler and takes no lock.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from ..protocol import BackendUnavailable
from . import archs

TIMEOUT_ENV = "RANKGRPO_CUDA_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
ENTRY = "python -m rankgrpo_kernels.backends.cuda.build"
LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
STAMP = "built"
LOG = "build.log"
LOG_TAIL = 3000  # characters of the build log a refusal quotes
FAILED: dict[str, BackendUnavailable] = {}  # extension name -> why its build failed in this process

# The child: torch's JIT build of the keyword arguments given as JSON, then the stamp (the module imported).
CHILD = ("import json, pathlib, sys\n"
         "from torch.utils import cpp_extension\n"
         "spec = json.loads(sys.argv[1])\n"
         "cpp_extension.load(**spec)\n"
         f"pathlib.Path(spec['build_directory'], {STAMP!r}).touch()\n")


def child_command(spec: dict) -> list[str]:
    """The build child's argv (tests replace it by a failing compiler, a hang, ...)."""
    return [sys.executable, "-c", CHILD, json.dumps(spec)]


def time_limit() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def nvcc() -> str:
    """torch's nvcc (CUDA_HOME's), else the one on PATH."""
    return str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc") if cpp_extension.CUDA_HOME else "nvcc"


def spec(csrc: Path) -> dict:
    """``cpp_extension.load``'s keyword arguments for the sources in ``csrc``: the name (with the hash), sources,
    flags (``archs.py``'s list when no GPU is visible) and build directory (under ``TORCH_EXTENSIONS_DIR``)."""
    sources = [csrc / "binding.cpp", *sorted(csrc.glob("*.cu"))]
    gpu_visible = torch.cuda.is_available()
    cuda_cflags = ["-O3", *archs.arch_flags(nvcc(), portable=False, gpu_visible=gpu_visible)]
    key = hashlib.sha256()
    for path in [*sources, *sorted(csrc.glob("*.cuh")), *sorted(csrc.glob("*.h"))]:
        key.update(path.name.encode() + path.read_bytes())
    devices = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] if gpu_visible else []
    key.update(json.dumps([cuda_cflags, os.environ.get(archs.ARCH_LIST_ENV), devices, torch.__version__,
                           torch.version.cuda, sys.version]).encode())
    name = f"rankgrpo_kernels_cuda_{key.hexdigest()[:16]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return dict(name=name, sources=list(map(str, sources)), extra_cflags=["-O3"], extra_cuda_cflags=cuda_cflags,
                build_directory=str(Path(root) / name), verbose=True)


def built(spec: dict) -> Path | None:
    """The built module of ``spec`` (None if it has not been built)."""
    directory = Path(spec["build_directory"])
    module = directory / f"{spec['name']}.so"
    return module if (directory / STAMP).is_file() and module.is_file() else None


def import_built(spec: dict):
    """Import the built module of ``spec`` (its file, without torch's build machinery)."""
    module_spec = importlib.util.spec_from_file_location(spec["name"], built(spec))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def remove_lock(directory: Path, stale) -> bool:
    """Remove torch's build lock in ``directory`` if ``stale(its mtime)``; whether it did."""
    lock = directory / LOCK
    try:
        if not stale(lock.stat().st_mtime):
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    return True


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL:].strip() if log.is_file() else "(no log)"


def build(spec: dict, timeout: float | None = None) -> Path:
    """Build ``spec`` in a child process killed after ``timeout`` seconds (``time_limit()`` by default); the built
    module. BackendUnavailable quoting the end of the build log when it fails or runs out of time."""
    if spec["name"] in FAILED:
        raise FAILED[spec["name"]]
    timeout = time_limit() if timeout is None else timeout
    directory = Path(spec["build_directory"])
    directory.mkdir(parents=True, exist_ok=True)
    remove_lock(directory, lambda mtime: time.time() - mtime > timeout)  # left by a build killed earlier
    log = directory / LOG
    started = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(child_command(spec), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            returncode = child.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # ninja and nvcc with it
            child.wait()
            returncode = None
    if returncode is None:
        remove_lock(directory, lambda mtime: mtime >= started - 1)  # the killed build's
        problem = f"took longer than {timeout:g} s and was stopped (raise {TIMEOUT_ENV} if it was only slow)"
    elif returncode != 0 or built(spec) is None:
        problem = f"failed (exit status {returncode})"
    else:
        return built(spec)
    FAILED[spec["name"]] = BackendUnavailable(
        f"backend='cuda': building csrc/ just in time {problem}; the end of {log}:\n{_log_tail(log)}\n"
        "Fix the build and rerun it with `" + ENTRY + "`, or use backend='triton' or 'torch'")
    raise FAILED[spec["name"]]


def main() -> int:
    """Build the extension unless it is prebuilt or built; print where it is, or why it cannot be."""
    from . import loader

    try:
        module = loader.load_extension(jit=True)
    except BackendUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"rankgrpo-kernels: the CUDA extension is ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
