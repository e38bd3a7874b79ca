"""The CUDA backend: the row and gradient passes (``csrc/row_pass.cu``) and the segment loss
(``csrc/segment_loss.cu``) as CUDA kernels around ``lm_head``'s cuBLAS GEMMs, through the thin binding
``csrc/binding.cpp``.

row_pass      one block per row: bias, logit scale, softcap and temperature, log-sum-exp, target logit, entropy
              and ``D = (onehot(y) - softmax(z)) S'(u)`` written over the fp32 logits in the GEMM operand dtype
              (4 + 2 bytes per logit for bf16 where the row is held in registers: V <= 16384, 8192 with a softcap,
              with 16-byte aligned rows, V % 4 == 0; 8 + 2 otherwise). Deterministic, no atomics.
grad_pass     the row pass's write pass with an entropy term: ``D' = [g (onehot - p) - e p (log p + H)] S'(u)``
              over the logits, 4 + 2 bytes per logit for bf16.
segment_loss  one block per row, linear in the row length: the loss, the statistics and ``g = dL/dlogp`` (fp32).

The extension is the one ``setup.py`` prebuilt (``rankgrpo_kernels._cuda``) or is compiled just in time from
``csrc/`` with ninja on first import and cached by torch (``TORCH_EXTENSIONS_DIR``). Importing this module raises
``CudaBackendUnavailable`` (an ImportError) naming the fix when neither is possible.

Equivalent PyTorch: ``torch_backend.row_pass``, ``torch_backend.grad_pass`` and ``torch_backend.segment_loss``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..contract import LOG_RATIO_LIMIT, ROW_SUMS, WEIGHTING, LossConfig, TokenBatch, loss_from_row_sums
from ..contract import row_relative_groups
from . import on_input_device

# The JIT build's sources: rankgrpo_kernels/csrc/ in an installed wheel (setup.py copies them there), else the
# source checkout's csrc/ (an editable install or a plain checkout on sys.path).
CSRC_CANDIDATES = (Path(__file__).resolve().parents[1] / "csrc", Path(__file__).resolve().parents[2] / "csrc")


def find_csrc(candidates=CSRC_CANDIDATES) -> Path:
    """The first candidate holding ``binding.cpp``; the first candidate (where a wheel puts them) if none does."""
    return next((path for path in candidates if (path / "binding.cpp").is_file()), candidates[0])


CSRC = find_csrc()

__all__ = ["row_pass", "grad_pass", "segment_loss", "CudaBackendUnavailable"]


class CudaBackendUnavailable(ImportError):
    """The CUDA extension is neither prebuilt nor buildable here; the message names the fix."""


def _load_extension():
    try:
        from .. import _cuda  # built by setup.py on machines with nvcc and a CUDA torch

        return _cuda
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise CudaBackendUnavailable(
            "backend='cuda' needs a CUDA build of torch (this one is CPU-only: torch.version.cuda is None); "
            "install torch from the CUDA wheel index, or use backend='triton' or 'torch'")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise CudaBackendUnavailable(
            f"backend='cuda' compiles csrc/ on first use and needs the CUDA toolkit (nvcc) matching torch's CUDA "
            f"{torch.version.cuda}: install it and set CUDA_HOME, or use backend='triton' or 'torch'")
    if not cpp_extension.is_ninja_available():
        raise CudaBackendUnavailable("backend='cuda' compiles csrc/ just in time with ninja: pip install ninja")
    sources = sorted(CSRC.glob("*.cu"))
    if not (CSRC / "binding.cpp").is_file() or not sources:
        raise CudaBackendUnavailable(
            f"backend='cuda' compiles {CSRC} just in time, but it is not there (an install without the sources); "
            "run pip install --no-build-isolation . from the repository on a machine with nvcc to prebuild it")
    return cpp_extension.load(name="rankgrpo_kernels_cuda", sources=[str(CSRC / "binding.cpp"), *map(str, sources)],
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])


_ext = _load_extension()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _grad_view(logits, grad_dtype):
    V = logits.shape[1]
    return logits if grad_dtype == torch.float32 else logits.view(grad_dtype)[:, :V]


@on_input_device
def row_pass(logits, bias, targets, inv_temperature, lse_in, grad_dtype, want_entropy, *, logit_scale=1.0,
             softcap=None):
    """Same contract as ``torch_backend.row_pass``; D is written over the logits (row r of D starts where row r of
    the logits starts, a strided view that cuBLAS takes as is)."""
    C = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(C, **f32)
    lse_in = lse_in.contiguous() if lse_in is not None else None
    lse = lse_in if lse_in is not None else torch.empty(C, **f32)
    entropy = torch.empty(C, **f32) if want_entropy else None
    grad = _grad_view(logits, grad_dtype) if grad_dtype is not None else None
    if C:
        _ext.row_pass(logits, bias.contiguous() if bias is not None else None, targets.contiguous(),
                      float(inv_temperature), float(logit_scale), None if softcap is None else float(softcap),
                      lse_in, logp, lse, entropy, grad, _stream(logits.device))
    return logp, lse, entropy, grad


@on_input_device
def grad_pass(logits, bias, targets, inv_temperature, lse, entropy, g, e, grad_dtype, *, logit_scale=1.0,
              softcap=None):
    """Same contract as ``torch_backend.grad_pass``; D' is written over the logits like the row pass's D."""
    grad = _grad_view(logits, grad_dtype)
    if logits.shape[0]:
        rows = [x.detach().to(torch.float32).contiguous() for x in (lse, entropy, g, e)]
        _ext.grad_pass(logits, bias.contiguous() if bias is not None else None, targets.contiguous(),
                       float(inv_temperature), float(logit_scale), None if softcap is None else float(softcap),
                       *rows, grad, _stream(logits.device))
    return grad


@on_input_device
def segment_loss(batch: TokenBatch, cfg: LossConfig):
    """Same contract as ``torch_backend.segment_loss``: (loss, stats, grad (B, T), row_clipped (B, 2)) in fp32."""
    B, T = batch.mask.shape
    device = batch.mask.device
    f32 = dict(dtype=torch.float32, device=device)
    group, num_bins = row_relative_groups(batch)

    def operand(x):
        return None if x is None else x.detach().to(torch.float32).contiguous()

    grad = torch.empty(B, T, **f32)
    row_sums = torch.empty(B, ROW_SUMS, **f32)
    _ext.segment_loss(operand(batch.logps), operand(batch.old_logps), operand(batch.ref_logps),
                      operand(batch.advantages), operand(batch.policy_weights), group, num_bins,
                      operand(batch.normaliser).reshape(1), operand(batch.tokens).reshape(1),
                      torch.empty(3, B, T, **f32), grad, row_sums, cfg.beta,
                      1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high, cfg.delta, WEIGHTING[cfg.loss_type],
                      LOG_RATIO_LIMIT, _stream(device))
    loss, stats, row_clipped = loss_from_row_sums(row_sums, batch)
    return loss, stats, grad, row_clipped
