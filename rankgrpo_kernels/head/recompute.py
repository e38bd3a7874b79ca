"""The recompute path: log-probs in the forward (``logprobs``), their LM-head gradients in the backward
(``logprob_grads``), for ``fused_logprobs`` and vocabulary-sharded heads.

Shapes: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,). The forward keeps ``lse`` per token; the
backward recomputes ``Z = h W^T`` for the tokens with a non-zero incoming gradient (one host sync to list them),
the row pass forms D with the saved ``lse``, then the gradient GEMMs (``grads.py``). Also the two chunk loops the
fused path shares: log-probs ``cap`` tokens at a time, and the recomputed gradients of an item longer than a chunk.

Equivalent PyTorch (holding all logits)::

    z = S(s (hidden @ weight.T + bias)).float() / temperature
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]
"""

from __future__ import annotations

import torch

from .. import backends
from ..specs import HeadSpec
from .grads import HeadPass, accumulate_grads, entropy_gradient_pass, grad_buffers
from .plan import accumulator_dtype, gemm_operands, tokens_per_chunk
from .scratch import LogitsBuffer


def chunked_logprobs(run: HeadPass, h, y, compute_entropy):
    """logp, lse and entropy (or None), each (C,), of the tokens of ``h`` (C, H), ``run.cap`` tokens at a time."""
    C = h.shape[0]
    dtype = run.logits.data.dtype
    logp, lse = (torch.empty(C, dtype=dtype, device=h.device) for _ in range(2))
    entropy = torch.empty(C, dtype=dtype, device=h.device) if compute_entropy else None
    for t0 in range(0, C, run.cap):
        t1 = min(C, t0 + run.cap)
        out = run.row_pass(run.logits_of(h[t0:t1]), y[t0:t1], compute_entropy=compute_entropy)
        logp[t0:t1], lse[t0:t1] = out.logp, out.lse
        if compute_entropy:
            entropy[t0:t1] = out.entropy
    return logp, lse, entropy


def recomputed_grads(run: HeadPass, h, y, lse, entropy, g, e, grads, first, rows_out):
    """Gradients of ``sum_t g_t logp_t + e_t H_t`` (``e`` None: no entropy term) over the tokens of ``h`` (C, H),
    their logits recomputed ``run.cap`` tokens at a time and D formed with the saved ``lse`` (and ``entropy``);
    ``d_hidden`` rows go to ``rows_out``."""
    for t0 in range(0, h.shape[0], run.cap):
        t1 = min(h.shape[0], t0 + run.cap)
        z = run.logits_of(h[t0:t1])
        if e is None:
            d_logits = run.row_pass(z, y[t0:t1], lse=lse[t0:t1], grad_dtype=run.grad_dtype).grad
            scale = run.row_scale(g[t0:t1])
        else:
            d_logits, scale = entropy_gradient_pass(run, z, y[t0:t1], lse[t0:t1], entropy[t0:t1], g[t0:t1],
                                                    e[t0:t1])
        accumulate_grads(d_logits, scale, h[t0:t1], run.weight, grads, first and t0 == 0, rows_out[t0:t1],
                         run.product)


def logprobs(hidden, weight, bias, targets, head: HeadSpec, compute_entropy: bool, positions=None):
    """logp, lse and entropy (or None), each (N,) in fp32 (fp64 for fp64 inputs), of the tokens at ``positions``
    ((n,) int64; None: all), 0 for the others. A target outside [0, V) (another vocabulary shard) has target logit
    0, so its logp is ``-lse``. ``head``: resolved (``HeadSpec.backend`` a backend, the budget an int)."""
    N, V = hidden.shape[0], weight.shape[0]
    h_op, w_op = gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    if positions is not None:
        h_op, targets = h_op.index_select(0, positions), targets.index_select(0, positions)
    cap = tokens_per_chunk(head.backend, V, hidden.shape[1], h_op.dtype, False, head.memory_budget_bytes)
    run = HeadPass(backends.load(head.backend), head, w_op, bias,
                   LogitsBuffer(min(h_op.shape[0], cap), V, acc, hidden.device, head.memory_budget_bytes), cap)
    out = chunked_logprobs(run, h_op, targets, compute_entropy)
    if positions is None:
        return out
    return tuple(None if x is None else torch.zeros(N, dtype=acc, device=hidden.device).index_copy_(0, positions, x)
                 for x in out)


def logprob_grads(hidden, weight, bias, targets, head: HeadSpec, lse, grad_logp, needs: tuple[bool, bool, bool],
                  entropy=None, grad_entropy=None):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] logp[t] + grad_entropy[t] entropy[t]`` given
    the forward's ``lse`` (and ``entropy``; ``grad_entropy`` None: no entropy term); None where ``needs`` says so.
    Only the tokens with a non-zero incoming gradient are recomputed (one host sync to list them)."""
    V, H = weight.shape
    h_op, w_op = gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    nonzero = grad_logp.reshape(-1) != 0
    if grad_entropy is not None:
        nonzero |= grad_entropy.reshape(-1) != 0
    active = nonzero.nonzero().squeeze(1)
    n_active = active.numel()
    grads = grad_buffers(hidden.shape[0], n_active, weight, bias, needs, hidden.dtype, acc, weight.dtype)
    if n_active:
        cap = tokens_per_chunk(head.backend, V, H, h_op.dtype, True, head.memory_budget_bytes)
        width = min(n_active, cap)
        product = torch.empty(width, H, dtype=acc, device=hidden.device) if needs[0] else None
        logits = LogitsBuffer(width, V, acc, hidden.device, head.memory_budget_bytes)
        run = HeadPass(backends.load(head.backend), head, w_op, bias, logits, cap, product, h_op.dtype)

        def take(x):
            return None if x is None else x.reshape(-1)[active].to(acc)

        recomputed_grads(run, h_op[active], targets[active], take(lse), take(entropy), take(grad_logp),
                         take(grad_entropy), grads, True, active)
    return grads.finish()
