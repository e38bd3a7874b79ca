"""Every Triton kernel compiles ahead of time for Hopper (sm_90a) and Ampere (sm_80) with its default tiles,
without a GPU: no spills, and the GEMM kernels run on the matrix units (wgmma on Hopper, mma on Ampere)."""

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
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_both_architectures(compiled):
    names = {(r["kernel"], r["arch"]) for r in compiled}
    kernels = {r["kernel"] for r in compiled}
    assert {"logprob_combine", "segment_loss"} <= kernels
    assert {f"logprob_{k}[{d}]" for k in ("partials", "backward") for d in ("bf16", "fp16", "fp32")} <= kernels
    assert names == {(k, a) for k in kernels for a in ("sm_90a", "sm_80")}


def test_no_spills(compiled):
    for r in compiled:
        assert r["spill_stores"] == r["spill_loads"] == r["local"] == 0, r


def test_matrix_units(compiled):
    for r in compiled:
        if not r["needs_matrix_units"]:
            continue
        if r["arch"] == "sm_80":
            assert r["mma"] and not r["wgmma"], r
        elif r["kernel"].endswith(("[bf16]", "[fp16]")) or "partials" in r["kernel"]:
            assert r["wgmma"], r  # Hopper's warpgroup MMA; the fp32 backward's 32-row tiles use mma.sync
        else:
            assert r["wgmma"] or r["mma"], r
