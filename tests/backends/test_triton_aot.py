"""Every Triton kernel (the row pass with and without a softcap, the gradient pass, the segment loss) compiles ahead
of time for Hopper (sm_90a) and Ampere (sm_80) with its shipped settings, without a GPU: no spills, no local memory,
and the row and gradient passes load vectors where rows are aligned."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_both_architectures(compiled):
    names = {(r["kernel"], r["arch"]) for r in compiled}
    kernels = {r["kernel"] for r in compiled}
    assert "segment_loss" in kernels
    assert {f"row_pass[{path},{grad}{softcap}{align}]" for path in ("single", "two_pass", "lse_in")
            for grad in ("none", "fp32", "bf16", "fp16") for softcap in ("", ",softcap")
            for align in ("", ",unaligned")} <= kernels
    assert {f"grad_pass[{grad}{softcap}{align}]" for grad in ("fp32", "bf16", "fp16") for softcap in ("", ",softcap")
            for align in ("", ",unaligned")} <= kernels
    assert names == {(k, a) for k in kernels for a in ("sm_90a", "sm_80")}


def test_row_pass_loads_vectors_when_aligned(compiled):
    """The row and gradient passes are bandwidth-bound: with V and the row stride multiples of 16 (what the JIT
    specialises on) their logits load 8 or 16 bytes a thread at a time."""
    rows = [r for r in compiled if r["kernel"].startswith(("row_pass[", "grad_pass["))]
    assert rows
    for r in rows:
        assert r["vector_loads"] == (not r["kernel"].endswith(",unaligned]")), r


def test_no_spills(compiled):
    for r in compiled:
        assert r["spill_stores"] == r["spill_loads"] == r["local"] == 0, r
