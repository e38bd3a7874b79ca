"""The fused loss: loss, statistics and LM-head gradients in one forward over chunks of whole items.

Shapes: hidden (N, H) with N = B * T tokens in row order, weight (V, H), bias (V,) or None, targets (N,).
``z = S(s (hidden @ weight.T + b)) / T`` and ``D = onehot(y) - softmax(z)`` (times ``S'``), so that the gradient
of a token's log-prob with respect to its raw logits ``h W^T`` is ``D s / T``.

A token's loss gradient ``g`` depends only on the log-probs of its own item and on normalisers fixed by the full
masks, so a chunk of whole items (``plan.token_plan``) knows its ``g`` as soon as its log-probs exist. Per chunk of
C listed tokens (``h_c = hidden[positions]``)::

    Z          = h_c W^T                  GEMM, fp32 output and accumulation: the only (C, V) buffer
    D, logp    = row_pass(Z)              one fused pass; D overwrites Z in the GEMM operand dtype (the torch
                                          backend with half operands on CUDA writes a separate D)
    g          = segment_loss(logp)       over the chunk's rows, every token outside the chunk neutral
    gradients  = grads.accumulate_grads(D, g s / T)

Each logit is computed once; the backward only scales the saved gradients by the incoming gradient. An item
longer than a chunk is the one exception: its logits are recomputed for its gradients (a fourth GEMM, with a
warning). Rows whose ``g`` is exactly 0 after the segment loss (clipped items) stay in the two gradient GEMMs:
leaving them out (a gather of their D rows) measured no faster on a CPU with a fifth of the rows clipped, and needs
a host sync per chunk on a GPU.

The entropy bonus (``LossSpec.entropy_coef``): ``-entropy_coef * sum_t E_t H_t / max(sum_t E_t, 1)`` with its
gradient, a mean over the tokens ``E = M & entropy_mask`` (``batch.entropy_mask``, or None: every loss token, the
mean of TRL, verl and OpenRLHF). Every loss token then enters, the row pass gives the statistics only and, once the
segment loss has given ``g``, the gradient pass writes ``D' = g (onehot - p) - e p (log p + H)`` with ``e = dL/dH =
-entropy_coef E_t / sum E`` over the same logits.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import backends
from ..contract import STAT_NAMES, TokenBatch
from ..specs import HeadSpec, LossSpec
from .grads import HeadPass, accumulate_grads, entropy_gradient_pass, grad_buffers
from .plan import (
    accumulator_dtype, gemm_operands, saved_grad_dtype, skips_zero_advantage_items, token_plan, tokens_per_chunk,
)
from .recompute import chunked_logprobs, recomputed_grads
from .scratch import LogitsBuffer

# The statistics of the policy's own distribution at a token, means over the tokens whose log-probs are computed.
LISTED_MEANS = [STAT_NAMES.index("ratio_mean"), STAT_NAMES.index("entropy"), STAT_NAMES.index("weight_mean")]
RATIO, ENTROPY, WEIGHT = LISTED_MEANS


def neutral_weight(spec: LossSpec) -> float:
    """The REINFORCE term's weight at a neutral token (ratio 1, advantage 0): CISPO's min(1, eps_high), VESPO's
    phi(1) = 1; 0 for the other loss types, which report none."""
    if not spec.reinforce:
        return 0.0
    return min(1.0, spec.clip_bounds[1])


def entropy_bonus_weights(batch: TokenBatch, dtype):
    """The tokens the entropy bonus averages over, flat (B T,) in ``dtype`` (``mask & entropy_mask``; the loss
    tokens when ``entropy_mask`` is None), and their count clamped to >= 1 (0-dim)."""
    weights = batch.mask if batch.entropy_mask is None else batch.mask & batch.entropy_mask
    weights = weights.reshape(-1).to(dtype)
    return weights, weights.sum().clamp(min=1)


def chunk_batch(batch: TokenBatch, positions, r0, r1, logp, entropy) -> tuple[TokenBatch, torch.Tensor]:
    """Rows [r0, r1) of ``batch`` holding the chunk's log-probs at ``positions`` (flat, of the batch). Every other
    token of those rows stays in the masks (so the normalisers, M_i and n_k are the batch's) but is neutral: log-
    probs, old and reference log-probs, advantage and policy weight 0, so it adds no loss, gradient, clip count or
    KL, and a ratio of exactly 1. Also returns the chunk's positions local to the rows."""
    T = batch.mask.shape[1]
    local = positions - r0 * T
    sub = batch.rows(r0, r1)
    size = (r1 - r0) * T
    in_chunk = torch.zeros(size, dtype=torch.bool, device=local.device).index_fill_(0, local, True).view(r1 - r0, T)

    def place(values):
        return torch.zeros(size, dtype=values.dtype, device=values.device).index_copy_(0, local, values).view(
            r1 - r0, T)

    def neutral(x):
        return None if x is None else torch.where(in_chunk, x, 0)

    sub.logps = place(logp)
    sub.entropy = place(entropy) if entropy is not None else None
    sub.old_logps, sub.ref_logps, sub.advantages, sub.policy_weights = (
        neutral(x) for x in (sub.old_logps, sub.ref_logps, sub.advantages, sub.policy_weights))
    return sub, local


def loss_and_grads(hidden, weight, bias, targets, batch: TokenBatch, spec: LossSpec, head: HeadSpec, *,
                   compute_entropy: bool, needs: tuple[bool, bool, bool]):
    """Loss, statistics, the per-row clip counts (B, 2), the number of tokens that entered the GEMMs (0-dim) and
    the gradients (d_hidden, d_weight, d_bias; None where ``needs`` says so) in ``saved_grad_dtype``, within
    ``head.memory_budget_bytes`` of scratch (``head`` resolved: a backend name and an int budget). ``batch.logps``
    and ``batch.entropy`` are unused. ``ratio_mean`` and ``entropy`` are means over the tokens that entered the
    GEMMs; where loss tokens exist but none entered (every item skipped), ``ratio_mean`` is 1 and ``entropy`` and
    ``weight_mean`` NaN."""
    V, H = weight.shape
    N = hidden.shape[0]
    h_op, w_op = gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    grad_dtype = h_op.dtype if any(needs) else None
    bonus = spec.entropy_coef != 0.0
    compute_entropy = compute_entropy or bonus
    cap = tokens_per_chunk(head.backend, V, H, h_op.dtype, grad_dtype is not None, head.memory_budget_bytes, bonus)
    plan = token_plan(batch, head.skip_zero_advantage and skips_zero_advantage_items(spec, batch), cap)
    # the entropy bonus's gradient pass reads the logits the statistics pass must leave as they are
    keep_logits = bonus and grad_dtype is not None and backends.REGISTRY[head.backend].stats_pass_overwrites
    grads = grad_buffers(N, plan.tokens, weight, bias, needs, saved_grad_dtype(hidden.dtype), acc,
                         saved_grad_dtype(weight.dtype))
    largest = max((c1 - c0 for c0, c1, _, _ in plan.chunks), default=0)
    if largest > cap:
        warnings.warn(f"rank_grpo_loss: the fp32 logits of an item of {largest} tokens x {V} vocabulary exceed "
                      f"memory_budget_bytes={head.memory_budget_bytes}; recomputing the logits of the items longer "
                      f"than {cap} tokens for their gradients (a fourth GEMM for them): raise the budget "
                      "(RANKGRPO_MEMORY_BUDGET) to avoid it", stacklevel=2)
    width = min(largest, cap)
    logits = LogitsBuffer(width, V, acc, hidden.device, head.memory_budget_bytes)
    run = HeadPass(backends.load(head.backend), head, w_op, bias, logits, cap,
                   torch.empty(width, H, dtype=acc, device=hidden.device) if grads.d_hidden is not None else None,
                   grad_dtype)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    stats = torch.zeros(len(STAT_NAMES), dtype=acc, device=hidden.device)
    row_clipped = torch.zeros(batch.mask.shape[0], 2, dtype=acc, device=hidden.device)
    tokens = batch.tokens.to(acc)
    if bonus:
        bonus_weights, bonus_tokens = entropy_bonus_weights(batch, acc)
    for c0, c1, r0, r1 in plan.chunks:
        positions = plan.positions[c0:c1]
        h, y = h_op.index_select(0, positions), targets.index_select(0, positions)
        fits = c1 - c0 <= cap
        if fits:
            z = run.logits_of(h)
            logp, lse, entropy, d_logits = run.row_pass(z.clone() if keep_logits else z, y,
                                                        grad_dtype=None if bonus else grad_dtype,
                                                        compute_entropy=compute_entropy)
        else:
            logp, lse, entropy = chunked_logprobs(run, h, y, compute_entropy)
        chunk, local = chunk_batch(batch, positions, r0, r1, logp, entropy)
        chunk_loss, chunk_stats, g, chunk_clipped = run.impl.segment_loss(chunk, spec=spec)
        loss += chunk_loss
        row_clipped[r0:r1] += chunk_clipped
        if bonus:
            e = -spec.entropy_coef * bonus_weights.index_select(0, positions) / bonus_tokens  # dL/dH
            loss += (e * entropy).sum()
        # the neutral tokens of the chunk's rows each added a ratio of exactly 1 and a weight
        neutral = (chunk.mask.sum() - (c1 - c0)).to(acc) / tokens
        chunk_stats[RATIO] -= neutral
        chunk_stats[WEIGHT] -= neutral * neutral_weight(spec)
        stats += chunk_stats
        if grad_dtype is None:
            continue
        g = g.reshape(-1).index_select(0, local).to(acc)
        if not fits:
            recomputed_grads(run, h, y, lse, entropy, g, e if bonus else None, grads, c0 == 0, positions)
            continue
        if bonus:
            d_logits, scale = entropy_gradient_pass(run, z, y, lse, entropy, g, e)
        else:
            scale = run.row_scale(g)
        accumulate_grads(d_logits, scale, h, w_op, grads, c0 == 0, positions, product=run.product)
    if plan.tokens:  # means over the listed tokens (all loss tokens unless items were skipped)
        stats[LISTED_MEANS] *= tokens / plan.tokens
    else:
        # Nothing listed, though the batch may hold loss tokens (every item skipped): ratio_mean is the neutral 1
        # (exact on-policy, where every ratio is 1) and entropy NaN, since none was measured and 0 would read as a
        # measurement. A batch without loss tokens keeps the reference's zeros.
        has_loss = batch.mask.any()
        stats[RATIO] = has_loss.to(acc)
        stats[ENTROPY] = torch.where(has_loss, math.nan, 0.0)
        stats[WEIGHT] = torch.where(has_loss, math.nan, 0.0)
    computed = torch.full((), plan.tokens, dtype=acc, device=hidden.device)  # a fill: plan.tokens is on the host
    return (loss, stats, row_clipped, computed, *grads.finish())
