"""Backends compute the LM head's log-probs, their gradients and the segment loss. Each is a module with

    logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy) -> logp, lse, entropy
    logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs) -> dh, dW, db
    segment_loss(batch, cfg) -> loss, stats, grad_logp

over flattened tokens (hidden (N, H), targets (N,)); ``cuda`` is the extension in ``csrc/`` (CUDA GPUs only). A target outside [0, V) lies in another vocabulary shard: it
adds no target logit in the forward and no one-hot term in the backward (``distributed.py`` builds on this). ``torch`` runs anywhere; ``triton`` needs Triton and a CUDA
GPU (or ``TRITON_INTERPRET=1``); ``auto`` picks Triton for CUDA tensors of fp32/bf16/fp16 when it imports.
"""

from __future__ import annotations

import importlib

import torch

from ..kernels.tiles import interpreting
from . import torch_backend

NAMES = ("torch", "triton", "cuda")


def load(name: str):
    """The backend module ``name``; ValueError naming the fix when it cannot run here."""
    if name == "torch":
        return torch_backend
    if name == "triton":
        try:
            return importlib.import_module(".triton_backend", __name__)
        except ImportError as exc:
            raise ValueError(f"backend='triton' needs the triton package ({exc}); use backend='torch'") from exc
    if name == "cuda":
        try:
            return importlib.import_module(".cuda_backend", __name__)
        except ImportError as exc:  # CudaBackendUnavailable names the fix
            raise ValueError(f"backend='cuda' cannot run here: {exc}") from exc
    raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")


def choose(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``auto`` to a backend name for tensors on ``device`` of ``dtype``."""
    if name != "auto":
        load(name)  # validates the name and that it imports
        if name == "triton" and device.type != "cuda" and not interpreting():
            raise ValueError("backend='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
        if name == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError("backend='triton' needs an Ampere (sm_80) or newer GPU; use backend='torch'")
        if name == "cuda" and device.type != "cuda":
            raise ValueError("backend='cuda' runs on CUDA tensors")
        return name
    if (device.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device)[0] >= 8):
        try:
            load("triton")
            return "triton"
        except ValueError:
            pass
    return "torch"
