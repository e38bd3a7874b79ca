"""The CUDA sources compile without a GPU: every ``csrc/*.cu`` with nvcc for each architecture both builds target
(``backends/cuda/archs.py``: sm_80, sm_90a, sm_100a, sm_120), warnings as errors, with ptxas's resource report
(``-Xptxas -v``) read back per kernel: no register spills and no stack frame, at most 255 registers a thread, static
shared memory within the 48 KiB a block may declare. The binding compiles (``-fsyntax-only``) against this torch's
headers, which on CI are the CPU wheel's.

Registers / spill stores (bytes), the most over the dtype, softcap and pass variants, nvcc 13.0
(``test_resource_table`` prints it with ``-s``); the fp32 stream kernel (fp32 D and bias, 16-byte vectors) walks two
vectors a tile, not four: at four it spilled 36 bytes (32 bytes of stack) on sm_120 with 64 registers. The stream
kernel's checked (last) tile reads in-row addresses instead of branching per vector, and the gradient pass reads its
row's g, e, H again for the target's entry: with a branch per vector, or g held across the walk, ptxas spilled 4-12
bytes at 32-48 registers.

    kernel                                  sm_80    sm_90a   sm_100a  sm_120
    row_pass_stream_kernel<f32,f32,4>       40/0     40/0     40/0     40/0     (was 60/0 61/0 64/0 64/36)
    row_pass_stream_kernel<other,4>         48/0     59/0     50/0     48/0
    row_pass_stream_kernel<*,1>             34/0     38/0     32/0     40/0
    row_pass_cached_kernel<softcap=0>       64/0     64/0     47/0     62/0
    row_pass_cached_kernel<softcap=1>       50/0     52/0     60/0     60/0
    segment_loss_kernel                     48/0     48/0     40/0     40/0     (was 46/0 46/0 42/0 40/0 before
                                                                                GMPO, SAPO, CISPO and VESPO)

Skipped where nvcc is missing (the binding check where no C++ compiler is). All compilations run in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from rankgrpo_kernels.backends.cuda import archs

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = tuple(f"sm_{cc}{suffix}" for cc, suffix in archs.ARCHS)  # what both builds compile for
MAX_REGISTERS = 255
MAX_STATIC_SHARED = 48 * 1024  # bytes of static shared memory per block, on every one of ARCHS
STD = "-std=c++20"  # what torch.utils.cpp_extension builds with


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


NVCC, CXX = _nvcc(), shutil.which("g++") or shutil.which("c++")


def _capability(arch: str) -> int:
    return int(arch.removeprefix("sm_").rstrip("a"))


def _nvcc_command(source: str, arch: str, out_dir: Path) -> list[str]:
    compute = arch.replace("sm_", "compute_")
    return [NVCC, STD, "-O3", f"-gencode=arch={compute},code={arch}", "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v", "-c", str(CSRC / source),
            "-o", str(out_dir / f"{source}.{arch}.o")]


def _binding_command() -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [CXX, STD, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=rankgrpo_kernels_cuda",
            *[arg for path in includes for arg in ("-isystem", path)], str(CSRC / "binding.cpp")]


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """Per entry function: registers, static shared memory, stack frame, spill stores and loads (bytes)."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = kernels.setdefault(m.group(1), dict(registers=0, smem=0, stack=0, spill_stores=0, spill_loads=0))
        elif m := re.search(r"Function properties for (\S+)", line):
            current = kernels.setdefault(m.group(1), dict(registers=0, smem=0, stack=0, spill_stores=0, spill_loads=0))
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{(file, arch): CompletedProcess} for every .cu and arch, and ("binding.cpp", "host") when a compiler exists."""
    if NVCC is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME) to compile csrc/")
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    supported = archs.nvcc_capabilities(NVCC)
    jobs = {(f, arch): _nvcc_command(f, arch, out_dir) for f in CU_FILES for arch in ARCHS
            if _capability(arch) in supported}
    if CXX is not None:
        jobs[("binding.cpp", "host")] = _binding_command()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        done = pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300), jobs.values())
        return dict(zip(jobs, done))


def test_sources_exist():
    assert {"segment_loss.cu", "row_pass.cu"} <= set(CU_FILES)
    assert (CSRC / "binding.cpp").is_file()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES)
def test_cu_compiles_within_limits(builds, source, arch):
    if (source, arch) not in builds:
        pytest.skip(f"this nvcc does not compile for {arch} (CUDA 12.8 or newer does)")
    result = builds[(source, arch)]
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = parse_ptxas(result.stderr)
    if "__global__" in (CSRC / source).read_text():
        assert any(k.startswith("_Z") and "kernel" in k for k in kernels), result.stderr[-2000:]
    for name, usage in kernels.items():
        assert usage["spill_stores"] == usage["spill_loads"] == 0, (name, arch, usage)
        assert usage["stack"] == 0, (name, arch, usage)  # no local memory
        assert usage["registers"] <= MAX_REGISTERS, (name, arch, usage)
        assert usage["smem"] <= MAX_STATIC_SHARED, (name, arch, usage)


def test_resource_table(builds):
    """Registers / spill stores per kernel and architecture, printed (``-s``): the module docstring's table."""
    rows: dict[str, dict[str, str]] = {}
    for (source, arch), result in builds.items():
        for name, usage in parse_ptxas(result.stderr if source != "binding.cpp" else "").items():
            rows.setdefault(name, {})[arch] = f"{usage['registers']}/{usage['spill_stores']}"
    for name, cells in sorted(rows.items()):
        print(name[-60:].ljust(62) + "".join(cells.get(a, "-").ljust(9) for a in ARCHS))
    assert rows


def test_binding_compiles_against_torch_headers(builds):
    if ("binding.cpp", "host") not in builds:
        pytest.skip("no C++ compiler (g++ or c++) to check csrc/binding.cpp")
    result = builds[("binding.cpp", "host")]
    assert result.returncode == 0, result.stderr[-4000:]


def test_parse_ptxas_reads_spills():
    report = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes smem, 440 bytes cmem[0]"""
    assert parse_ptxas(report) == {"_Z6kernelPf": dict(registers=255, smem=512, stack=8, spill_stores=4,
                                                        spill_loads=4)}
