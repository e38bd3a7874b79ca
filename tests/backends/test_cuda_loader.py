"""The CUDA backend refuses, never raises or hangs, when its extension cannot be built: a compiler that fails, a
build that runs past the time limit, a stale torch build lock; with ``RANKGRPO_CUDA_JIT=0`` (what the test suite
sets) it builds nothing and says how to build. Also the architecture flags of both builds (``archs.py``).

This torch is CPU-only: the prerequisites check is stubbed and the build child replaced by a fake (``build.
child_command``) that plays torch's part, its ``FileBaton`` lock included. Each test takes a second or two.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from rankgrpo_kernels import backends
from rankgrpo_kernels.backends import registry
from rankgrpo_kernels.backends.cuda import archs, build, loader
from rankgrpo_kernels.backends.protocol import BackendUnavailable

KERNELS = "rankgrpo_kernels.backends.cuda.kernels"


def fake_child(body: str):
    """A ``build.child_command`` that starts as torch's JIT build does, taking the build directory's FileBaton
    (waiting while the lock file exists), then runs ``body`` (which releases it or not)."""
    def command(spec):
        lock = os.path.join(spec["build_directory"], build.LOCK)
        script = ("import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
                  f"baton = FileBaton({lock!r})\n"
                  "if not baton.try_acquire():\n    baton.wait()\n    baton.try_acquire()\n"
                  f"print('ninja: building csrc/ (fake)', flush=True)\n{body}\n")
        return [sys.executable, "-c", script]
    return command


FAILS = fake_child("print('row_pass.cu(12): error: identifier \"oops\" is undefined', flush=True)\n"
                   "baton.release()\nsys.exit(1)")
HANGS = fake_child("time.sleep(120)")


@pytest.fixture
def jit(monkeypatch, tmp_path):
    """A JIT build that may run (RANKGRPO_CUDA_JIT=1, prerequisites met) into ``tmp_path``; no nvcc is asked
    (TORCH_CUDA_ARCH_LIST set), no failure remembered from earlier, the kernels module reimported."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(archs.ARCH_LIST_ENV, "9.0")
    monkeypatch.setenv(loader.JIT_ENV, "1")
    monkeypatch.setattr(loader, "missing_prerequisite", lambda: None)
    monkeypatch.setattr(build, "FAILED", {})
    monkeypatch.delitem(sys.modules, KERNELS, raising=False)
    registry.load.cache_clear()
    yield Path(tmp_path) / build.spec(loader.CSRC)["name"]
    registry.load.cache_clear()


def test_failed_compiler_refuses_with_the_log_tail(jit, monkeypatch):
    monkeypatch.setattr(build, "child_command", FAILS)
    with pytest.raises(BackendUnavailable, match=r"(?s)failed \(exit status 1\).*identifier \"oops\" is undefined"):
        loader.load_extension()
    monkeypatch.setattr(build, "child_command", lambda spec: pytest.fail("rebuilt"))
    with pytest.raises(BackendUnavailable, match="oops"):  # remembered: not rebuilt in this process
        loader.load_extension()


def test_the_registry_refuses_and_available_still_works(jit, monkeypatch):
    """On a (pretended) GPU: the refusal users see carries the log's tail; the other backends stay available."""
    monkeypatch.setattr(build, "child_command", FAILS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    assert "oops" in backends.refusal("cuda", cuda, torch.float32)
    assert "cuda" not in backends.available(cuda, torch.float32)
    assert "torch" in backends.available(cuda, torch.float32)
    with pytest.raises(ValueError, match="(?s)backend='cuda' cannot run here.*oops"):
        backends.choose("cuda", cuda, torch.float32)


def test_hung_build_is_stopped_at_the_time_limit(jit, monkeypatch):
    monkeypatch.setattr(build, "child_command", HANGS)
    monkeypatch.setenv(build.TIMEOUT_ENV, "3")
    started = time.time()
    with pytest.raises(BackendUnavailable, match=r"(?s)longer than 3 s.*RANKGRPO_CUDA_BUILD_TIMEOUT.*fake"):
        loader.load_extension()
    assert time.time() - started < 30
    assert not (jit / build.LOCK).exists()  # the killed build's lock is gone: the next build does not wait on it


def test_stale_lock_is_cleared(jit, monkeypatch):
    """A lock older than the time limit (a build killed earlier) no longer blocks the build: it runs and fails with
    its own error, instead of waiting on the lock until the time limit."""
    monkeypatch.setattr(build, "child_command", FAILS)
    monkeypatch.setenv(build.TIMEOUT_ENV, "20")
    jit.mkdir(parents=True)
    (jit / build.LOCK).touch()
    hour_ago = time.time() - 3600
    os.utime(jit / build.LOCK, (hour_ago, hour_ago))
    started = time.time()
    with pytest.raises(BackendUnavailable, match="oops"):
        loader.load_extension()
    assert time.time() - started < 15


def test_fresh_lock_is_left_to_its_build(tmp_path):
    (tmp_path / build.LOCK).touch()
    assert not build.remove_lock(tmp_path, lambda mtime: time.time() - mtime > 60)
    assert (tmp_path / build.LOCK).exists()


def test_without_jit_nothing_is_built(jit, monkeypatch):
    monkeypatch.setenv(loader.JIT_ENV, "0")
    monkeypatch.setattr(build, "child_command", lambda spec: pytest.fail("built"))
    with pytest.raises(BackendUnavailable, match=r"not built yet: run `python -m rankgrpo_kernels\.backends\.cuda\."
                                                 r"build`"):
        loader.load_extension()
    with pytest.raises(ValueError, match="not built yet"):
        registry.load("cuda")


def test_the_test_suite_never_builds():
    assert os.environ.get(loader.JIT_ENV) == "0"


def test_build_entry_point_reports_the_refusal(jit, monkeypatch, capsys):
    """``python -m rankgrpo_kernels.backends.cuda.build`` builds (whatever RANKGRPO_CUDA_JIT says) and exits 1
    with the reason when it cannot."""
    monkeypatch.setenv(loader.JIT_ENV, "0")
    monkeypatch.setattr(build, "child_command", FAILS)
    assert build.main() == 1
    assert "oops" in capsys.readouterr().err


def test_package_import_builds_nothing(jit, monkeypatch):
    import importlib

    monkeypatch.setattr(build, "child_command", lambda spec: pytest.fail("built"))
    importlib.reload(importlib.import_module("rankgrpo_kernels.backends.cuda"))
    assert KERNELS not in sys.modules


def test_time_limit_names_its_variable(monkeypatch):
    monkeypatch.setenv(build.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="RANKGRPO_CUDA_BUILD_TIMEOUT must be a number"):
        build.time_limit()
    monkeypatch.delenv(build.TIMEOUT_ENV)
    assert build.time_limit() == build.DEFAULT_TIMEOUT_S


# --- archs.py: the architecture flags --------------------------------------------------------------------------

NVCC_13 = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}  # nvcc 13.0 --list-gpu-arch
NVCC_12_4 = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90}


def test_gencode_flags_name_four_architectures_and_ptx_of_the_newest():
    assert archs.gencode_flags(NVCC_13) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100a,code=sm_100a", "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120"]


def test_gencode_flags_leave_out_what_nvcc_lacks():
    assert archs.gencode_flags(NVCC_12_4) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90"]  # PTX in its portable, non-"a" form
    with pytest.raises(RuntimeError, match="CUDA 12.8 or newer"):
        archs.gencode_flags({70, 75})


@pytest.fixture
def fake_nvcc(tmp_path):
    """An nvcc that lists nvcc 13.0's architectures."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho " + " ".join(f"compute_{c}" for c in sorted(NVCC_13)) + "\n")
    nvcc.chmod(0o755)
    return str(nvcc)


def test_arch_flags_of_each_build(fake_nvcc):
    portable = archs.gencode_flags(NVCC_13)
    assert archs.arch_flags(fake_nvcc, portable=True, environ={}) == portable  # setup.py, GPU or not
    assert archs.arch_flags(fake_nvcc, portable=True, gpu_visible=True, environ={}) == portable
    assert archs.arch_flags(fake_nvcc, portable=False, gpu_visible=False, environ={}) == portable  # JIT, no GPU
    assert archs.arch_flags(fake_nvcc, portable=False, gpu_visible=True, environ={}) == []  # JIT: torch's, the GPU's
    for portable_build in (True, False):  # TORCH_CUDA_ARCH_LIST wins: torch turns it into flags
        assert archs.arch_flags(fake_nvcc, portable=portable_build, environ={"TORCH_CUDA_ARCH_LIST": "9.0"}) == []


def test_setup_loads_archs_without_torch():
    """setup.py loads archs.py by path: it imports neither torch nor the package."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    script = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('a', {str(Path(archs.__file__))!r})\n"
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              "assert 'torch' not in sys.modules and 'rankgrpo_kernels' not in sys.modules, sorted(sys.modules)\n"
              "print(m.ARCHS)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "load_archs().arch_flags(nvcc, portable=True)" in (root / "setup.py").read_text()
