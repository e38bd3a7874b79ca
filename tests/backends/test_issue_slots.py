"""The row pass's inner loops stay memory-bound on an H200: their issue slots per 256 logits in the sm_90a SASS
(``issue_slots.py``: Triton's kernels compiled ahead of time, ``csrc/row_pass.cu`` through nvcc) are at most the
slots the schedulers offer while HBM moves those logits' bytes (``issue_slots.memory_slots``: 8 + g bytes a logit
for the two-pass walk, 4 + g for one read and one write, 4 for statistics alone; g the itemsize of D).

sm_90a, Triton 3.9 / nvcc 13.0, slots per 256 logits (statistics + write), bf16 bias, bf16 D (``-s`` prints all):

    path                                   before          after         bound
    Triton two-pass, softcap               389 + 413       213 + 214     558
    Triton two-pass                        236 + 160       108 + 67      558
    Triton statistics only, softcap        384             213           223
    Triton gradient pass, softcap          456             233           335
    CUDA stream (4-wide), softcap          787 + 1259 *    206 + 218     558
    CUDA stream (4-wide)                   389 + 677 *     90 + 75       558

    * static counts of loops holding both transforms behind a runtime branch (and IEEE division and tanhf slow
      paths), so above what one path issues; the softcap's path alone: 1573 + 2518 instructions a tile of 16
      logits a thread when compiled with the branch fixed (``csrc/row_pass.cu`` before this change).

Not bounded here: a row held whole in registers (Triton's single block, CUDA's cached kernel) counts its whole body,
per-row reductions included, over 8 logits a thread with a softcap: 510 slots per 256 logits for Triton (was 660),
819 for CUDA (was 1620; static counts, with a division's slow path and block reductions that walk 32 warps' partials
one by one), where 335 would be memory-bound, so rows of at most 8192 logits with a softcap stay instruction-bound.
Skipped without triton or nvcc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .issue_slots import memory_slots

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("issue_slots.py")
ITEMSIZE = {"none": 0, "fp32": 4, "bf16": 2, "fp16": 2}


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    found = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in found:
        print(f"{r['impl']:<7}{r['kernel']:<58}{' + '.join(f'{x:.0f}' for x in r['slots_per_256'])}")
    return found


def _triton_bound(kernel: str) -> float | None:
    """The bytes a logit of a Triton kernel variant moves, as slots; None for a row held whole."""
    fields = kernel[kernel.index("[") + 1: -1].split(",")
    if kernel.startswith("grad_pass["):
        return memory_slots(4 + ITEMSIZE[fields[0]])
    path, g = fields[0], ITEMSIZE[fields[1]]
    return {"two_pass": memory_slots(8 + g if g else 4), "lse_in": memory_slots(4 + g), "single": None}[path]


def test_triton_loops_are_memory_bound(rows):
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    assert len(triton_rows) == 30
    for r in triton_rows:
        bound = _triton_bound(r["kernel"])
        if bound is not None:
            assert sum(r["slots_per_256"]) <= bound, (r["kernel"], r["slots_per_256"], bound)


def test_cuda_stream_loops_are_memory_bound(rows):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    stream = [r for r in rows if r["impl"] == "cuda" and r["kernel"].startswith("row_pass_stream_kernel")]
    assert len(stream) == 72
    for r in stream:
        grad_pass = r["kernel"].endswith("true>")
        assert r["branches"] == 0, r  # straight-line bodies: the count is what each tile issues
        assert len(r["slots_per_256"]) == (1 if grad_pass else 2), r
        bound = memory_slots((4 if grad_pass else 8) + ITEMSIZE[r["grad"]])
        assert sum(r["slots_per_256"]) <= bound, (r["kernel"], r["slots_per_256"], bound)


def test_memory_slots():
    assert round(memory_slots(10)) == 558 and round(memory_slots(6)) == 335 and round(memory_slots(4)) == 223
