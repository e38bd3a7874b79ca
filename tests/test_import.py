"""``import rankgrpo_kernels`` works without Triton, a compiler or the training frameworks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
for name in ("triton", "trl", "transformers", "liger_kernel", "cut_cross_entropy"):
    sys.modules[name] = None  # any import of these now fails
import torch
import rankgrpo_kernels as rk
hidden, weight = torch.randn(1, 3, 4, requires_grad=True), torch.randn(9, 4)
loss, _ = rk.rank_grpo_loss(hidden, weight, torch.zeros(1, 3, dtype=torch.long),
                            item_ids=torch.zeros(1, 3, dtype=torch.long), advantages=torch.ones(1, 3))
loss.backward()
try:
    rk.fused_logprobs(hidden, weight, torch.zeros(1, 3, dtype=torch.long), backend="triton")
except ValueError as exc:
    assert "backend='torch'" in str(exc), exc
else:
    raise AssertionError("backend='triton' without triton must fail")
print("ok")
"""


def test_import_and_torch_backend_without_optional_packages():
    env_path = str(ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=env_path,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
