"""Every Triton kernel (the row pass with and without a softcap, the gradient pass, the segment loss) compiles ahead
of time for Ampere (sm_80), Hopper (sm_90a), Blackwell (sm_100a) and consumer Blackwell (sm_120a) with its shipped
settings, without a GPU, through ptxas as Triton runs it (its flags: ``aot_compile.PTXAS_FLAGS``): no spills, no
stack frame, no local memory, and the row and gradient passes load vectors where rows are aligned.

Registers (the most of any variant) / spill stores in bytes (all variants), Triton 3.9 with its bundled ptxas;
``test_resource_table`` prints it (``-s``):

    kernel                                sm_80      sm_90a     sm_100a    sm_120a
    segment_loss                          48/0       48/0       48/0       48/0      (40 46 46 47 before the
                                                                                   GMPO, SAPO, CISPO, VESPO terms)
    row_pass                              64/0       64/0       79/0       100/0
    grad_pass                             45/0       47/0       46/0       44/0

(the row pass's most: the unaligned two-pass walk with a softcap, 8 warps, whose scalar loads keep more values live
on Blackwell; it was 70 / 77 before the softcap row pass went to base 2 and grouped statistics, see
``test_issue_slots.py``).

The fp32-gradient two-pass walk with a softcap on unaligned rows spilled 4 bytes (8 of stack) on sm_90a at 8 warps
with Triton's ptxas flags: Hopper's fp32 row pass runs 16 (``tiles.ROW_PASS_HOPPER_FP32``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")
ARCHS = ("sm_80", "sm_90a", "sm_100a", "sm_120a")



@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_every_architecture(compiled):
    names = {(r["kernel"], r["arch"]) for r in compiled}
    kernels = {r["kernel"] for r in compiled}
    assert {f"segment_loss[policy={policy}]" for policy in range(5)} <= kernels  # contract.POLICY's terms
    assert {f"row_pass[{path},{grad}{softcap}{align}]" for path in ("single", "two_pass", "lse_in")
            for grad in ("none", "fp32", "bf16", "fp16") for softcap in ("", ",softcap")
            for align in ("", ",unaligned")} <= kernels
    assert {f"grad_pass[{grad}{softcap}{align}]" for grad in ("fp32", "bf16", "fp16") for softcap in ("", ",softcap")
            for align in ("", ",unaligned")} <= kernels
    assert names == {(k, a) for k in kernels for a in ARCHS}


def test_row_pass_loads_vectors_when_aligned(compiled):
    """The row and gradient passes are bandwidth-bound: with V and the row stride multiples of 16 (what the JIT
    specialises on) their logits load 8 or 16 bytes a thread at a time."""
    rows = [r for r in compiled if r["kernel"].startswith(("row_pass[", "grad_pass["))]
    assert rows
    for r in rows:
        assert r["vector_loads"] == (not r["kernel"].endswith(",unaligned]")), r


def _spills(r) -> bool:
    return any(r[k] for k in ("spill_stores", "spill_loads", "stack_frame", "stack", "local"))


def test_no_spills(compiled):
    spilling = {(r["kernel"], r["arch"]): r for r in compiled if _spills(r)}
    assert not spilling, spilling


def test_resource_table(compiled):
    """Per kernel family (the name before "[") and architecture: the most registers of its variants and their spill
    stores; printed (``-s``) and matching the module docstring's table in shape."""
    table: dict[str, dict[str, list[int]]] = {}
    for r in compiled:
        cell = table.setdefault(r["kernel"].split("[")[0], {}).setdefault(r["arch"], [0, 0])
        cell[0], cell[1] = max(cell[0], r["registers"]), cell[1] + r["spill_stores"]
    print("\n" + "kernel".ljust(38) + "".join(a.ljust(11) for a in ARCHS))
    for kernel, cells in table.items():
        assert set(cells) == set(ARCHS), kernel
        print(kernel.ljust(38) + "".join(f"{cells[a][0]}/{cells[a][1]}".ljust(11) for a in ARCHS))
