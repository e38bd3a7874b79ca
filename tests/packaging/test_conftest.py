"""The test run picks the Triton interpreter from ``torch.cuda.is_available()``, not from device files: conftest
played in a fresh process with torch's answer forced either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.mark.parametrize("gpu, interpret", [(True, None), (False, "1")])
def test_interpreter_iff_no_gpu(gpu, interpret):
    script = (f"import os, runpy, sys, torch; torch.cuda.is_available = lambda: {gpu}; "
              f"runpy.run_path({str(CONFTEST)!r}); assert 'triton' not in sys.modules; "
              "print(os.environ.get('TRITON_INTERPRET'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=CONFTEST.parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(interpret)
