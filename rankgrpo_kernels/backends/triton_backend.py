"""The Triton backend: fused kernels for the log-prob forward, the segment loss and the backward (CUDA GPUs, or
the CPU under ``TRITON_INTERPRET=1`` for tests). Same interface as ``torch_backend``; ``budget_bytes`` is unused
since no kernel holds more than its register tiles and (vocabulary splits x tokens) fp32 partials.

Under ``torch.use_deterministic_algorithms(True)`` the backward runs the torch backend's chunked GEMMs instead of
the kernel's float atomics, so repeated runs give bit-identical gradients.
"""

from __future__ import annotations

import torch

from ..kernels import logprob_backward as _backward
from ..kernels import logprob_forward as _forward
from ..kernels.segment_loss import segment_loss
from . import torch_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["logprob_forward", "logprob_backward", "segment_loss"]


def _rows_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_dtype(hidden):
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' takes hidden/weight in {SUPPORTED_DTYPES}, got {hidden.dtype}; "
                        "use backend='torch' for float64")


def logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy=False):
    _check_dtype(hidden)
    return _forward.logprob_forward(_rows_contiguous(hidden), _rows_contiguous(weight), bias, targets.contiguous(),
                                    temperature, return_entropy)


def logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs):
    if torch.are_deterministic_algorithms_enabled():
        return torch_backend.logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp,
                                              budget_bytes, needs)
    return _backward.logprob_backward(_rows_contiguous(hidden), _rows_contiguous(weight), bias,
                                      targets.contiguous(), temperature, lse, grad_logp.contiguous(), needs)
