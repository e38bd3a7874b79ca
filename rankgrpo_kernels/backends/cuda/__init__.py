"""The CUDA backend: the row and gradient passes (``csrc/row_pass.cu``) and the segment loss
(``csrc/segment_loss.cu``) as CUDA kernels around the head's cuBLAS GEMMs, through the thin binding
``csrc/binding.cpp``.

row_pass      one block per row: bias, logit scale, softcap and temperature, log-sum-exp, target logit, entropy
              and ``D = (onehot(y) - softmax(z)) S'(u)`` written over the fp32 logits in the GEMM operand dtype
              (4 + 2 bytes per logit for bf16 where the row is held in registers: V <= 16384, 8192 with a softcap,
              with 16-byte aligned rows, V % 4 == 0; 8 + 2 otherwise). Deterministic, no atomics.
grad_pass     the row pass's write pass with an entropy term: ``D' = [g (onehot - p) - e p (log p + H)] S'(u)``
              over the logits, 4 + 2 bytes per logit for bf16.
segment_loss  one block per row, linear in the row length: the loss, the statistics and ``g = dL/dlogp`` (fp32).

The calls live in ``kernels.py`` and are imported on first use: importing this package builds nothing (``python -m
rankgrpo_kernels.backends.cuda.build`` runs before the extension exists); the first access to a call loads the
extension (``loader.py``: prebuilt, or built just in time under a time limit) and raises
``protocol.BackendUnavailable`` (an ImportError) naming the fix when it cannot.

Equivalent PyTorch: ``backends/torch``.
"""

from __future__ import annotations

import importlib

__all__ = ["row_pass", "grad_pass", "segment_loss"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.kernels"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
