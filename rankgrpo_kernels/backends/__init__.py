"""The backend registry. A backend is a module implementing the non-GEMM pieces of ``lm_head`` over plain tensors:

    row_pass(logits, bias, targets, inv_temperature, lse_in, grad_dtype, want_entropy, *, logit_scale=1.0,
             softcap=None)
        -> logp, lse, entropy-or-None, D-or-None          (see ``torch_backend.row_pass`` for the contract)
    grad_pass(logits, bias, targets, inv_temperature, lse, entropy, g, e, grad_dtype, *, logit_scale=1.0,
              softcap=None)
        -> D'                                             (``torch_backend.grad_pass``: with an entropy term)
    segment_loss(batch: TokenBatch, cfg: LossConfig) -> loss, stats, grad_logp, row_clipped (B, 2)

The logits are ``z = S(logit_scale (acc + bias)) / T`` with ``S(u) = softcap tanh(u / softcap)`` (or u); ``D`` and
``D'`` hold ``dL/dz S'(u)`` per row up to the caller's row scale (``g logit_scale / T`` for D, ``logit_scale / T``
for D').

The GEMMs around them are the vendor's (``lm_head``). Each entry below says where the backend runs; ``choose``
resolves ``"auto"`` and refuses a backend that cannot run here with a message naming the fix. A new backend is one
module and one entry: ``tests/test_backends.py`` runs every available entry through the same conformance suite.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from ..kernels.tiles import interpreting

HALF = (torch.bfloat16, torch.float16)
TORCH_OUT_DTYPE = (2, 8)  # torch.mm(..., out_dtype=float32) for half operands on CUDA, used by every GEMM


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # relative to this package
    dtypes: tuple[torch.dtype, ...]
    needs_cuda: bool  # True: CUDA tensors only (Triton also runs on the CPU under TRITON_INTERPRET=1)
    d_in_place_any_dtype: bool  # the row pass writes D over the fp32 logits in any dtype (else only in fp32)
    stats_pass_overwrites: bool  # a row pass without D still overwrites the logits (grad_pass then needs a copy)

    def grad_in_place(self, acc_dtype: torch.dtype, grad_dtype: torch.dtype | None) -> bool:
        """Whether D overwrites the logits buffer (else the row pass needs one (C, V) tensor of ``grad_dtype``)."""
        return grad_dtype is None or grad_dtype == acc_dtype or self.d_in_place_any_dtype

    def refusal(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run on ``device`` with ``dtype`` (None if it can)."""
        if dtype not in self.dtypes:
            return f"backend={self.name!r} takes {self.dtypes}, got {dtype}; use backend='torch'"
        on_cpu_interpreter = self.name == "triton" and device.type == "cpu" and interpreting()
        if self.needs_cuda and device.type != "cuda" and not on_cpu_interpreter:
            return f"backend={self.name!r} runs on CUDA tensors, got {device.type}; use backend='torch'"
        if device.type == "cuda" and self.needs_cuda and torch.cuda.get_device_capability(device)[0] < 8:
            return f"backend={self.name!r} needs an Ampere (sm_80) or newer GPU; use backend='torch'"
        if device.type == "cuda" and dtype in HALF and torch_version() < TORCH_OUT_DTYPE:
            return (f"bf16/fp16 on CUDA needs torch >= 2.8 (GEMMs with fp32 output, out_dtype=); this is "
                    f"torch {torch.__version__}: pip install -U 'torch>=2.8'")
        if torch.compiler.is_compiling():  # imports do not trace; the op itself raises if the module cannot load
            return None
        try:
            load(self.name)
        except ValueError as exc:
            return str(exc)
        return None


REGISTRY = {
    backend.name: backend
    for backend in (
        # torch ops, any device: the CPU path
        Backend("torch", ".torch_backend", (torch.float64, torch.float32, *HALF), False, False, True),
        # Triton kernels (kernels/): CUDA sm_80+, or the CPU under TRITON_INTERPRET=1
        Backend("triton", ".triton_backend", (torch.float32, *HALF), True, True, False),
        # CUDA kernels (csrc/): CUDA sm_80+
        Backend("cuda", ".cuda_backend", (torch.float32, *HALF), True, True, False),
    )
}
AUTO_ORDER = ("triton", "torch")  # what "auto" tries, first that can run


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def load(name: str):
    """The backend module ``name``; ValueError naming the fix when it does not import here."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {tuple(REGISTRY)}, got {name!r}")
    try:
        return importlib.import_module(REGISTRY[name].module, __name__)
    except ImportError as exc:  # e.g. no triton package; the CUDA backend's error names its fix
        raise ValueError(f"backend={name!r} cannot run here ({exc}); use backend='torch'") from exc


def choose(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``auto`` to a backend name for tensors on ``device`` of ``dtype``; refuse what cannot run."""
    if name == "auto":
        candidates = [c for c in AUTO_ORDER if device.type == "cuda" or not REGISTRY[c].needs_cuda]
        for candidate in candidates:
            if REGISTRY[candidate].refusal(device, dtype) is None:
                return candidate
        raise ValueError(REGISTRY[candidates[-1]].refusal(device, dtype))
    if name not in REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {tuple(REGISTRY)}, got {name!r}")
    reason = REGISTRY[name].refusal(device, dtype)
    if reason is not None:
        raise ValueError(reason)
    return name


def on_input_device(fn):
    """Run a backend function with its first tensor's GPU as the current device, so that its kernels launch there
    (on that device's current stream) whatever device is current."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device = (first.mask if hasattr(first, "mask") else first).device
        if device.type != "cuda":
            return fn(first, *args, **kwargs)
        with torch.cuda.device(device):
            return fn(first, *args, **kwargs)

    return run


def available(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends that can run on ``device`` with ``dtype`` here (what the conformance tests iterate over)."""
    return [name for name, backend in REGISTRY.items() if backend.refusal(device, dtype) is None]
