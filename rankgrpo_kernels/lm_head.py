"""The LM head in bounded chunks: vendor GEMMs around a backend's row pass and segment loss.

Shapes: hidden (N, H) with N = B * T tokens in row order, weight (V, H), bias (V,) or None, targets (N,).
``z = (hidden @ weight.T + bias) / temperature`` and ``D = onehot(y) - softmax(z)``, so that the gradient of a
token's log-prob with respect to its raw logits ``h W^T`` is ``D / temperature``.

Gradient in the forward (``loss_and_grads``, what ``rank_grpo_loss`` runs). A token's loss gradient ``g`` depends
only on the log-probs of its own item and on normalisers fixed by the masks, so a chunk of whole rows knows its
``g`` as soon as its log-probs exist. Per chunk of C = rows * T tokens::

    Z          = h_c W^T                  GEMM, fp32 output and accumulation: the only (C, V) buffer
    D, logp    = row_pass(Z)              one fused pass; D overwrites Z in the GEMM operand dtype (the torch
                                          backend with half operands on CUDA writes a separate D)
    g          = segment_loss(logp)       O(C), the chunk's exact share of the loss and statistics
    d_hidden_c = (g / T) * (D W)          GEMM with fp32 output, one row scale and cast
    d_weight  += D^T ((g / T) * h_c)      GEMM accumulating in fp32 in place (beta = 1)
    d_bias    += (g / T)^T D              GEMV accumulating in place

Each logit is computed once; the backward only scales the saved gradients by the incoming gradient.

Recompute (``logprobs``, then ``logprob_grads`` in the backward): for ``fused_logprobs``, vocabulary-sharded heads
and rows longer than the budget. The forward keeps ``lse`` per token; the backward recomputes Z for the tokens with
a non-zero gradient (one host sync to list them), the row pass forms D with the saved ``lse``, then the same GEMMs.

GEMMs: bf16/fp16 operands on CUDA give fp32 outputs through ``out_dtype``; a CPU has no such GEMM, so there the
operands are upcast once per call. No atomics anywhere: results are bit-identical from run to run.

Equivalent PyTorch (holding all logits)::

    z = (hidden @ weight.T + bias).float() / temperature
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]
"""

from __future__ import annotations

import math

import torch

from . import backends
from .contract import STAT_NAMES, LossConfig, TokenBatch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype (and so D's): the inputs' on CUDA and for fp32/fp64, fp32 for half inputs on a CPU."""
    if hidden.device.type == "cuda" or hidden.dtype == accumulator_dtype(hidden.dtype):
        return hidden.dtype
    return torch.float32


def _gemm_operands(hidden, weight):
    dtype = gemm_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


def _mm(a, b, out):
    """``out = a @ b`` with the output's (fp32/fp64) precision for products and sums."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_(total, a, b, *, beta=1.0, alpha=1.0):
    """``total = beta total + alpha a @ b`` inside the GEMM, accumulating in ``total``'s precision (``beta = 0``
    writes without reading ``total``)."""
    if a.dtype == total.dtype:
        return torch.addmm(total, a, b, beta=beta, alpha=alpha, out=total)
    return torch.addmm(total, a, b, out_dtype=total.dtype, beta=beta, alpha=alpha, out=total)


def bytes_per_token(backend: str, vocab, hidden_size, dtype, needs_grad) -> int:
    """Scratch per token of a chunk with GEMM operands of ``dtype`` (``gemm_dtype``): its fp32 logits row (plus a
    separate D row where the backend cannot write D in place), and with gradients its fp32 (D W) row and its
    scaled hidden row."""
    acc = accumulator_dtype(dtype)
    grad_dtype = dtype if needs_grad else None
    per_logit = acc.itemsize
    if not backends.REGISTRY[backend].grad_in_place(acc, grad_dtype):
        per_logit += grad_dtype.itemsize
    per_row = 0 if grad_dtype is None else hidden_size * (acc.itemsize + grad_dtype.itemsize)
    return vocab * per_logit + per_row


def rows_per_chunk(backend: str, row_length, vocab, hidden_size, dtype, needs_grad, budget_bytes) -> int:
    """Whole rows per chunk of the gradient-in-forward path; 0 if one row does not fit the budget."""
    return budget_bytes // max(1, row_length * bytes_per_token(backend, vocab, hidden_size, dtype, needs_grad))


def _grad_buffers(tokens, weight, bias, needs, dtype, acc):
    """d_hidden (tokens, H) in ``dtype``, d_weight and d_bias in ``acc``; None where not needed. Uninitialised when
    a chunk will write them (the first writes d_weight and d_bias, later ones add), zeros for no tokens."""
    need_h, need_w, need_b = needs
    new = torch.empty if tokens else torch.zeros
    device = weight.device
    d_hidden = new(tokens, weight.shape[1], dtype=dtype, device=device) if need_h else None
    d_weight = new(weight.shape, dtype=acc, device=device) if need_w else None
    d_bias = new(weight.shape[0], dtype=acc, device=device) if need_b and bias is not None else None
    return d_hidden, d_weight, d_bias


def _accumulate_grads(d_logits, scale, h, weight, grads, t0, t1, product):
    """With D (C, V) and ``scale = g / T`` (C,): ``d_hidden[t0:t1] = scale (D W)``, ``d_weight += D^T (scale h)``,
    ``d_bias += scale^T D``; the first chunk (``t0 == 0``) writes the sums instead of adding to them. ``product``
    is (C, H) fp32 scratch, or None when ``d_hidden`` is fp32 itself."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        rows = _mm(d_logits, weight, out=d_hidden[t0:t1] if product is None else product[: t1 - t0])
        torch.mul(rows, scale[:, None].to(rows.dtype), out=d_hidden[t0:t1])
    if d_weight is None and d_bias is None:
        return
    factor = _operand_factor(scale, d_logits.dtype)
    accumulate = dict(beta=0.0 if t0 == 0 else 1.0, alpha=1.0 / factor)
    if d_weight is not None:
        # where, not a product: a token outside the loss may hold a NaN hidden state, and its D row is 0.
        scaled = torch.where(scale[:, None] != 0, h * (scale[:, None] * factor), 0).to(d_logits.dtype)
        _addmm_(d_weight, d_logits.T, scaled, **accumulate)
    if d_bias is not None:
        _addmm_(d_bias[None], (scale[None] * factor).to(d_logits.dtype), d_logits, **accumulate)


def _operand_factor(scale, dtype) -> float:
    """A power of two that brings ``scale = g / T`` near 1 before it enters an fp16 GEMM operand, whose normal range
    stops at 6e-5 (bnpo over 16k tokens puts g near there); the GEMM's alpha takes it out again. One host sync per
    chunk, for fp16 only; 1 for other dtypes (bf16 has fp32's range)."""
    if dtype != torch.float16:
        return 1.0
    peak = float(scale.abs().amax()) if scale.numel() else 0.0
    return 2.0 ** -math.floor(math.log2(peak)) if 0.0 < peak < math.inf else 1.0


def _finish_grads(grads, dtype):
    d_hidden, d_weight, d_bias = grads
    return (d_hidden, d_weight.to(dtype) if d_weight is not None else None,
            d_bias.to(dtype) if d_bias is not None else None)


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradients ``loss_and_grads`` returns: the inputs', but fp32 for fp16 inputs, whose tiny
    gradients would flush to zero before the backward applies a loss scale (``GradScaler``)."""
    return torch.float32 if dtype == torch.float16 else dtype


def loss_and_grads(backend: str, hidden, weight, bias, targets, batch: TokenBatch, cfg: LossConfig, temperature: float,
                   compute_entropy: bool, rows: int, needs: tuple[bool, bool, bool]):
    """Loss, statistics and the gradients (d_hidden, d_weight, d_bias; None where ``needs`` says so) of the fused
    loss, ``rows`` whole rows per chunk (``rows_per_chunk``), in ``saved_grad_dtype``. ``batch.logps`` and
    ``batch.entropy`` are unused."""
    impl = backends.load(backend)
    B, T = batch.mask.shape
    V, H = weight.shape
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    grad_dtype = h_op.dtype if any(needs) else None
    grads = _grad_buffers(B * T, weight, bias, needs, saved_grad_dtype(hidden.dtype), acc)
    chunk_tokens = min(rows, B) * T
    logits = torch.empty(chunk_tokens * V, dtype=acc, device=hidden.device)
    product = (torch.empty(chunk_tokens, H, dtype=acc, device=hidden.device)
               if grads[0] is not None and grads[0].dtype != acc else None)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    stats = torch.zeros(len(STAT_NAMES), dtype=acc, device=hidden.device)
    inv_t = 1.0 / temperature
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        t0, t1 = r0 * T, r1 * T
        z = _mm(h_op[t0:t1], w_op.T, out=logits[: (t1 - t0) * V].view(t1 - t0, V))
        chunk = batch.rows(r0, r1)
        logp, _, entropy, d_logits = impl.row_pass(z, bias, targets[t0:t1], chunk.mask.reshape(-1), inv_t, None,
                                                   grad_dtype, compute_entropy)
        chunk.logps = logp.view(r1 - r0, T)
        chunk.entropy = entropy.view(r1 - r0, T) if entropy is not None else None
        chunk_loss, chunk_stats, g = impl.segment_loss(chunk, cfg)
        loss += chunk_loss
        stats += chunk_stats
        if grad_dtype is not None:
            _accumulate_grads(d_logits, g.reshape(-1).to(acc) * inv_t, h_op[t0:t1], w_op, grads, t0, t1, product)
    return (loss, stats, *_finish_grads(grads, saved_grad_dtype(weight.dtype)))


def tokens_per_chunk(backend: str, vocab, hidden_size, dtype, needs_grad, budget_bytes) -> int:
    """Tokens per chunk of the recompute path: at least one token's whole vocabulary row."""
    return max(1, budget_bytes // bytes_per_token(backend, vocab, hidden_size, dtype, needs_grad))


def logprobs(backend: str, hidden, weight, bias, targets, temperature: float, budget_bytes: int, want_entropy: bool):
    """logp, lse and entropy (or None), each (N,) in fp32 (fp64 for fp64 inputs). A target outside [0, V) (another
    vocabulary shard) has target logit 0, so its logp is ``-lse``."""
    impl = backends.load(backend)
    N, V = hidden.shape[0], weight.shape[0]
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    chunk = tokens_per_chunk(backend, V, hidden.shape[1], h_op.dtype, False, budget_bytes)
    logits = torch.empty(min(N, chunk) * V, dtype=acc, device=hidden.device)
    logp, lse = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(2))
    entropy = torch.empty(N, dtype=acc, device=hidden.device) if want_entropy else None
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        z = _mm(h_op[t0:t1], w_op.T, out=logits[: (t1 - t0) * V].view(t1 - t0, V))
        out = impl.row_pass(z, bias, targets[t0:t1], None, 1.0 / temperature, None, None, want_entropy)
        logp[t0:t1], lse[t0:t1] = out[0], out[1]
        if want_entropy:
            entropy[t0:t1] = out[2]
    return logp, lse, entropy


def logprob_grads(backend: str, hidden, weight, bias, targets, temperature: float, lse, grad_logp, budget_bytes: int,
                  needs: tuple[bool, bool, bool]):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] * logp[t]`` given the forward's ``lse``;
    None where ``needs`` says so. Only the tokens with ``grad_logp != 0`` are recomputed."""
    impl = backends.load(backend)
    V, H = weight.shape
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    active = grad_logp.reshape(-1).nonzero().squeeze(1)
    n_active = active.numel()
    need_h, need_w, need_b = needs
    grads = _grad_buffers(n_active, weight, bias, needs, hidden.dtype, acc)
    if n_active:
        h, y, lse_active = h_op[active], targets[active], lse.reshape(-1)[active].to(acc)
        scale = grad_logp.reshape(-1)[active].to(acc) / temperature
        chunk = tokens_per_chunk(backend, V, H, h_op.dtype, True, budget_bytes)
        logits = torch.empty(min(n_active, chunk) * V, dtype=acc, device=hidden.device)
        product = (torch.empty(min(n_active, chunk), H, dtype=acc, device=hidden.device)
                   if need_h and hidden.dtype != acc else None)
        for t0 in range(0, n_active, chunk):
            t1 = min(n_active, t0 + chunk)
            z = _mm(h[t0:t1], w_op.T, out=logits[: (t1 - t0) * V].view(t1 - t0, V))
            d_logits = impl.row_pass(z, bias, y[t0:t1], None, 1.0 / temperature, lse_active[t0:t1], h_op.dtype,
                                     False)[3]
            _accumulate_grads(d_logits, scale[t0:t1], h[t0:t1], w_op, grads, t0, t1, product)
    d_hidden, d_weight, d_bias = _finish_grads(grads, weight.dtype)
    if need_h:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, active, d_hidden)
    return d_hidden, d_weight, d_bias
