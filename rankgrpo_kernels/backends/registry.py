"""The backend registry: one line per backend, imported lazily and checked against ``protocol.CALLS``.

``choose`` resolves ``"auto"`` (the first of ``AUTO_ORDER`` that can run) and refuses a backend that cannot run on
the inputs' device and dtype with a message naming the fix; ``available`` lists those that can (what the
conformance suite iterates over). A new backend is one folder under ``backends/`` and one line here.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .protocol import HALF, Capabilities, check

REGISTRY = {
    # torch ops, any device and float64: the CPU path and the readable statement of the others
    "torch": Capabilities((torch.float64, torch.float32, *HALF), cuda_only=False, d_in_place_any_dtype=False,
                          stats_pass_overwrites=True),
    # Triton kernels: CUDA sm_80+, or the CPU under TRITON_INTERPRET=1
    "triton": Capabilities((torch.float32, *HALF), cuda_only=True, d_in_place_any_dtype=True,
                           stats_pass_overwrites=False, cpu_env="TRITON_INTERPRET"),
    # CUDA kernels (csrc/): CUDA sm_80+
    "cuda": Capabilities((torch.float32, *HALF), cuda_only=True, d_in_place_any_dtype=True,
                         stats_pass_overwrites=False),
}
AUTO_ORDER = ("triton", "torch")
TORCH_OUT_DTYPE = (2, 8)  # torch.mm(..., out_dtype=float32) for half operands on CUDA, used by every GEMM


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _unknown(name) -> ValueError:
    return ValueError(f"backend must be 'auto' or one of {names()}, got {name!r}")


@functools.cache
def load(name: str):
    """The backend module ``name``, checked against the protocol once; ValueError naming the fix when it cannot
    import here."""
    if name not in REGISTRY:
        raise _unknown(name)
    try:
        module = importlib.import_module(f"{__package__}.{name}")
        check(module)  # the CUDA backend loads its extension here, on first access to a call
    except ImportError as exc:  # no triton package; the CUDA backend's BackendUnavailable names its fix
        raise ValueError(f"backend={name!r} cannot run here ({exc}); use backend='torch'") from exc
    return module


def refusal(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with ``dtype`` here (None if it can)."""
    if name not in REGISTRY:
        return str(_unknown(name))
    caps = REGISTRY[name]
    if dtype not in caps.dtypes:
        return f"backend={name!r} takes {caps.dtypes}, got {dtype}; use backend='torch'"
    on_cpu = caps.cpu_env is not None and device.type == "cpu" and os.environ.get(caps.cpu_env, "0") == "1"
    if caps.cuda_only and device.type != "cuda" and not on_cpu:
        return f"backend={name!r} runs on CUDA tensors, got {device.type}; use backend='torch'"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"backend={name!r}: no CUDA device here"
    if device.type == "cuda" and caps.cuda_only and torch.cuda.get_device_capability(device)[0] < 8:
        return f"backend={name!r} needs an Ampere (sm_80) or newer GPU; use backend='torch'"
    if device.type == "cuda" and dtype in HALF and torch_version() < TORCH_OUT_DTYPE:
        return (f"bf16/fp16 on CUDA needs torch >= 2.8 (GEMMs with fp32 output, out_dtype=); this is "
                f"torch {torch.__version__}: pip install -U 'torch>=2.8'")
    if torch.compiler.is_compiling():  # imports do not trace; the op itself raises if the module cannot load
        return None
    try:
        load(name)
    except ValueError as exc:
        return str(exc)
    return None


def choose(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``auto`` to a backend name for tensors on ``device`` of ``dtype``; refuse what cannot run."""
    if name == "auto":
        candidates = [c for c in AUTO_ORDER if device.type == "cuda" or not REGISTRY[c].cuda_only]
        for candidate in candidates:
            if refusal(candidate, device, dtype) is None:
                return candidate
        raise ValueError(refusal(candidates[-1], device, dtype))
    reason = refusal(name, device, dtype)
    if reason is not None:
        raise ValueError(reason)
    return name


def available(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends that can run on ``device`` with ``dtype`` here."""
    return [name for name in REGISTRY if refusal(name, device, dtype) is None]


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
