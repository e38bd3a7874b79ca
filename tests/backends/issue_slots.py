"""Issue slots per logit of the row pass's inner loops, read from the SASS that ``cuobjdump -sass`` prints.

A warp issues one instruction per slot for its 32 lanes, so a loop body of n instructions that handles k logits a
thread costs ``n * 256 / (32 k)`` slots per 256 logits (a warp's 32 lanes x 8). Where a kernel has no loop (a row
held whole in registers) its whole body counts, per-row reductions included. An H200 (132 SMs x 4 schedulers at
1.98 GHz issue 1.05e12 warp instructions a second; HBM at 4.8 TB/s) issues ``memory_slots(b)`` = 55.7 b slots in the
time 256 logits of b bytes each take to move: 558 for the two-pass walk with a 2-byte D (8 + 2 bytes a logit), 335
for one read and one write (4 + 2), 223 for a statistics-only read (4). A loop above that is instruction-bound.

Run as a script it prints the table for sm_90a, Triton's kernels as ``aot_compile.py`` builds them and
``csrc/row_pass.cu`` through ``nvcc -cubin -arch=sm_90a`` (``--json``: one JSON object per kernel)::

    python tests/backends/issue_slots.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+0x([0-9a-f]+)")
LOGITS = 256  # the unit: a warp's 32 lanes x 8
H200 = dict(sms=132, schedulers=4, clock_hz=1.98e9, bytes_per_s=4.8e12)
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def memory_slots(bytes_per_logit: float, gpu=H200) -> float:
    """Issue slots an SM's schedulers offer per 256 logits while HBM moves their bytes."""
    seconds = LOGITS * bytes_per_logit * gpu["sms"] / gpu["bytes_per_s"]
    return seconds * gpu["clock_hz"] * gpu["schedulers"]


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{function name: [(address, instruction)]} from ``cuobjdump -sass``, without the padding NOPs after the last
    EXIT and the final self-branch."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := LINE.search(line)):
            current.append((int(m.group(1), 16), m.group(2).strip()))
    for code in out.values():
        while code and (code[-1][1] == "NOP" or _target(code[-1][1]) == code[-1][0]):
            code.pop()
    return out


def _target(instruction: str) -> int | None:
    m = BRANCH.match(instruction)
    return int(m.group(1), 16) if m else None


def loops(code: list[tuple[int, str]]) -> list[dict]:
    """Every backward branch as a loop, in address order: its instructions and its forward branches (0: a
    straight-line body, whose count is what every iteration issues)."""
    found = []
    for address, instruction in code:
        target = _target(instruction)
        if target is not None and target < address:
            body = [ins for a, ins in code if target <= a <= address]
            found.append(dict(instructions=len(body), branches=sum(_target(ins) is not None for ins in body[:-1])))
    return found


def per_256(instructions: int, logits_per_thread: float) -> float:
    """Issue slots per 256 logits of a body handling ``logits_per_thread`` logits in each of its lanes."""
    return instructions * LOGITS / (32 * logits_per_thread)


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def sass_of(binary: Path) -> str:
    return subprocess.run([cuobjdump(), "-sass", str(binary)], capture_output=True, text=True, check=True).stdout


def cuda_row_pass(nvcc: str, arch: str = "sm_90a") -> list[dict]:
    """Per kernel of ``csrc/row_pass.cu`` (template arguments demangled: grad, bias, vector width, softcap,
    gradient pass): slots per 256 logits of each loop (statistics, then write), or of the cached kernel's whole body.
    The streaming kernel walks kStreamUnroll vectors a thread a tile: two for fp32 D and bias with 4-wide vectors,
    four otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "row_pass.cubin")
        subprocess.run([nvcc, "-std=c++20", "-O3", "-cubin", f"-arch={arch}", "-o", str(cubin),
                        str(CSRC / "row_pass.cu")], check=True)
        sass = sass_of(cubin)
    rows = []
    for mangled, code in functions(sass).items():
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout
        m = re.search(r"(row_pass_\w+_kernel)<(.*)>\(", name)
        if not m:
            continue
        args = [a.strip().replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
                for a in m.group(2).split(",")]
        found = loops(code)
        if m.group(1) == "row_pass_cached_kernel":
            per_thread = 8 if args[2] == "true" else 16
            slots = [per_256(len(code), per_thread)]
        else:
            vec = int(args[2])
            per_thread = vec * (2 if args[0] == args[1] == "fp32" and vec == 4 else 4)
            slots = [per_256(loop["instructions"], per_thread) for loop in found]
        rows.append(dict(kernel=f"{m.group(1)}<{', '.join(args)}>", grad=args[0], bias=args[1],
                         softcap=args[-2 if m.group(1) == "row_pass_stream_kernel" else -1] == "true",
                         slots_per_256=slots, branches=sum(loop["branches"] for loop in found)))
    return rows


def triton_row_pass(capability: int = 90) -> list[dict]:
    """Triton's row and gradient passes as ``aot_compile.py`` builds them (aligned rows), with their slots per 256
    logits. Imports ``aot_compile``, which sets TRITON_INTERPRET=0 before importing triton: a process of its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import aot_compile

    key = "sm_90" if capability >= 90 else "sm_80"
    return [aot_compile.compile_one(*spec, capability, attrs=attrs) for spec, attrs in aot_compile.row_pass_kernels(key)
            if not spec[0].endswith(",unaligned]")]


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    rows = [dict(r, impl="triton") for r in triton_row_pass()]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        rows += [dict(r, impl="cuda") for r in cuda_row_pass(nvcc)]
    for r in rows:
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{r['impl']:<7}{r['kernel']:<58}{' + '.join(f'{x:.0f}' for x in r['slots_per_256'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
