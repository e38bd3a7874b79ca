"""The CUDA backend: hand-written kernels in ``csrc/`` around cuBLAS GEMMs on bounded vocabulary slabs.

Same interface as ``torch_backend``. With ``z = (h W^T + b) / T`` over (token chunk x vocabulary slab) tiles sized
by ``budget_bytes`` (``config.plan_chunks``):

forward   ``acc = h W[v0:v1]^T`` by cuBLAS in fp32 (``torch.mm(..., out_dtype=float32)``), then the
          ``logprob_slab_forward`` kernel merges the slab into per-token fp32 running max / sum exp / sum exp * z and
          picks the target logit; ``logprob_finish`` forms ``lse``, ``logp`` and the entropy.
segment   ``segment_loss.cu``: one block per row, the loss, the statistics and ``g = dL/dlogp`` (fp32).
backward  for the tokens with ``g != 0`` only (one host sync, as the torch backend), the slab is recomputed and
          ``logprob_slab_backward`` writes ``dZ = g / T (onehot(y) - p)`` in the operand dtype plus fp32 column
          sums for ``d_bias``; cuBLAS forms ``d_hidden += dZ W[v0:v1]`` and ``d_weight[v0:v1] = dZ^T h`` in fp32.

Scratch beyond the budget: per-token fp32 vectors, the fp32 ``d_hidden`` of the active tokens, and one fp32
(token chunk x H) product that is added into it. The extension is the one ``setup.py`` prebuilt
(``rankgrpo_kernels._cuda``) or is compiled just in time from ``csrc/`` with ninja on first import and cached by
torch (``TORCH_EXTENSIONS_DIR``). Importing this module raises ``CudaBackendUnavailable`` (an ImportError) naming
the fix when neither is possible.

Equivalent PyTorch::

    z = (hidden @ weight.T + bias).float() / T
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..settings import plan_chunks
from ..contract import LOG_RATIO_LIMIT, ROW_SUMS, WEIGHTING, LossConfig, TokenBatch, loss_from_row_sums

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKWARD_ROWS_PER_BLOCK = 32  # csrc/rankgrpo_cuda.h: kBackwardRowsPerBlock
CSRC = Path(__file__).resolve().parents[2] / "csrc"

__all__ = ["logprob_forward", "logprob_backward", "segment_loss", "CudaBackendUnavailable"]


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


def _on_input_device(fn):
    """Run ``fn`` with its inputs' GPU as the current device: the kernels launch there, on its current stream."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device = (first.mask if isinstance(first, TokenBatch) else first).device
        if device.type != "cuda":
            raise ValueError("backend='cuda' runs on CUDA tensors")
        with torch.cuda.device(device):
            return fn(first, *args, **kwargs)

    return run


def _check(hidden, weight, bias):
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"backend='cuda' takes hidden and weight of one dtype in {SUPPORTED_DTYPES}, got "
                        f"{hidden.dtype} and {weight.dtype}; use backend='torch' for float64")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"backend='cuda' takes the bias in the weight's dtype {weight.dtype}, got {bias.dtype}")


def _mm(a, b, out):
    """``out = a @ b`` with fp32 output and accumulation (cuBLAS; bf16/fp16 operands through ``out_dtype``)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _view(buffer, rows, cols):
    """A contiguous (rows, cols) view of the front of a flat scratch buffer."""
    return buffer[: rows * cols].view(rows, cols)


@_on_input_device
def logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy=False):
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> logp, lse, entropy-or-None (N,) fp32."""
    _check(hidden, weight, bias)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.long().contiguous()
    bias = bias.contiguous() if bias is not None else None
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    running_max = torch.full((N,), float("-inf"), **f32)
    running_sum, target_logit = torch.zeros(N, **f32), torch.zeros(N, **f32)
    running_sum_z = torch.zeros(N, **f32) if return_entropy else None
    token_chunk, vocab_chunk = plan_chunks(N, V, budget_bytes, 4)
    logits = torch.empty(min(N, token_chunk) * min(V, vocab_chunk), **f32)
    stream, inv_t = _stream(hidden.device), 1.0 / temperature
    for t0 in range(0, N, token_chunk):
        t1 = min(N, t0 + token_chunk)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            z = _mm(hidden[t0:t1], weight[v0:v1].T, _view(logits, t1 - t0, v1 - v0))
            _ext.logprob_slab_forward(z, bias[v0:v1] if bias is not None else None, v0, targets[t0:t1], inv_t,
                                      running_max[t0:t1], running_sum[t0:t1],
                                      running_sum_z[t0:t1] if return_entropy else None, target_logit[t0:t1], stream)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if return_entropy else None
    _ext.logprob_finish(running_max, running_sum, running_sum_z, target_logit, logp, lse, entropy, stream)
    return logp, lse, entropy


@_on_input_device
def logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] * logp[t]``; ``needs`` says which to form."""
    _check(hidden, weight, bias)
    need_h, need_w, need_b = needs
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    inv_t = 1.0 / temperature
    active = grad_logp.reshape(-1).nonzero().squeeze(1)
    h, y = hidden[active], targets.reshape(-1)[active].long()
    coef = grad_logp.reshape(-1)[active].float() * inv_t
    lse_active = lse.reshape(-1)[active].float()
    n_active = active.numel()

    d_hidden = torch.zeros(n_active, H, **f32) if need_h else None
    d_weight = torch.zeros_like(weight) if need_w else None
    d_bias = torch.zeros(V, **f32) if need_b else None
    if n_active:
        # Live per (token, vocab) entry: the fp32 slab, dZ, the d_bias partials; per vocabulary row with d_weight:
        # its fp32 slab and the product added into it.
        token_chunk, vocab_chunk = plan_chunks(n_active, V, budget_bytes, 4 + hidden.element_size() + 1,
                                               8 * H if need_w else 0)
        rows, cols = min(n_active, token_chunk), min(V, vocab_chunk)
        logits = torch.empty(rows * cols, **f32)
        d_logits = torch.empty(rows * cols, dtype=hidden.dtype, device=hidden.device)
        partials = torch.empty(-(-rows // BACKWARD_ROWS_PER_BLOCK) * cols, **f32) if need_b else None
        d_hidden_product = torch.empty(rows * H, **f32) if need_h else None
        d_weight_slab, d_weight_product = (torch.empty(cols * H, **f32) for _ in range(2)) if need_w else (None, None)
        stream = _stream(hidden.device)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            w_slab = weight[v0:v1]
            for t0 in range(0, n_active, token_chunk):
                t1 = min(n_active, t0 + token_chunk)
                z = _mm(h[t0:t1], w_slab.T, _view(logits, t1 - t0, v1 - v0))
                d_z = _view(d_logits, t1 - t0, v1 - v0)
                bias_partials = _view(partials, -(-(t1 - t0) // BACKWARD_ROWS_PER_BLOCK), v1 - v0) if need_b else None
                _ext.logprob_slab_backward(z, bias[v0:v1] if bias is not None else None, v0, y[t0:t1],
                                           lse_active[t0:t1], coef[t0:t1], inv_t, d_z, bias_partials, stream)
                if need_b:
                    d_bias[v0:v1] += bias_partials.sum(0)
                if need_h:
                    d_hidden[t0:t1] += _mm(d_z, w_slab, _view(d_hidden_product, t1 - t0, H))
                if need_w:
                    if t0 == 0:
                        _mm(d_z.T, h[t0:t1], _view(d_weight_slab, v1 - v0, H))
                    else:
                        _view(d_weight_slab, v1 - v0, H).add_(_mm(d_z.T, h[t0:t1], _view(d_weight_product, v1 - v0, H)))
            if need_w:
                d_weight[v0:v1] = _view(d_weight_slab, v1 - v0, H)

    if need_h:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, active, d_hidden.to(hidden.dtype))
    if need_b:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


@_on_input_device
def segment_loss(batch: TokenBatch, cfg: LossConfig):
    """Same contract as ``rankgrpo_kernels.segment_loss.segment_loss``: (loss, stats, grad (B, T)) in fp32."""
    B, T = batch.mask.shape
    device = batch.mask.device
    f32 = dict(dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device).unsqueeze(1) * T
    group = torch.where(batch.mask, batch.group - rows, -1).to(torch.int32).contiguous()
    num_bins = (group.amax(1) + 1).to(torch.int32) if T else torch.zeros(B, dtype=torch.int32, device=device)
    tokens = batch.mask.sum().clamp(min=1).to(torch.float32).reshape(1)

    def operand(x):
        return None if x is None else x.detach().to(torch.float32).contiguous()

    grad = torch.empty(B, T, **f32)
    row_sums = torch.empty(B, ROW_SUMS, **f32)
    _ext.segment_loss(operand(batch.logps), operand(batch.old_logps), operand(batch.ref_logps),
                      operand(batch.advantages), group, num_bins, batch.normaliser.to(torch.float32).reshape(1),
                      tokens, torch.empty(3, B, T, **f32), grad, row_sums, cfg.beta, 1.0 - cfg.epsilon_low,
                      1.0 + cfg.epsilon_high, cfg.delta, WEIGHTING[cfg.loss_type], LOG_RATIO_LIMIT,
                      _stream(device))
    loss, stats = loss_from_row_sums(row_sums, tokens[0], batch)
    return loss, stats, grad
