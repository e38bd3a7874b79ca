"""The segment loss in one Triton program per row: item ratios, clipping, KL, the loss, statistics and ``g``.

The maths is ``rankgrpo_kernels.segment_loss`` (its docstring gives ``g = dL/dlogp``). Each program owns one row
of T tokens whose items carry row-relative group ids in [0, num_bins) (-1 outside the loss) and makes three
passes over the row, every sum in a fixed order (deterministic, no atomics, no host sync):

1. per item: masked token count ``n_k`` and mean log-ratio ``log w_k``;
2. per item: ``sum_{t in k} c_t * (-a_t * act_t)``, the loss's derivative with respect to ``w_k``;
3. per token: ``g_t``, and the row's loss and statistics sums, reduced over rows afterwards by torch.

Per item the work is (tokens x items) comparisons in registers, fine for the ~20 items of a ranked list.

Equivalent PyTorch: ``rankgrpo_kernels.segment_loss.segment_loss(batch, cfg)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import LOG_RATIO_LIMIT, ROW_SUMS, STAT_NAMES, WEIGHTING, LossConfig, TokenBatch, loss_from_row_sums

BLOCK_T, BLOCK_B = 64, 32  # tokens x items compared per step


@triton.jit
def _item_terms(log_w, a, lo, hi, delta, log_ratio_limit, HAS_DELTA: tl.constexpr):
    """Ratio, its bounded and clipped forms, the two branches and d(min)/dw / a (ties split as torch.min)."""
    w = tl.exp(tl.minimum(log_w, log_ratio_limit))
    w_clipped = tl.minimum(tl.maximum(w, lo), hi)
    if HAS_DELTA:
        w_unclipped = tl.minimum(w, delta)
        grad_unclipped = tl.where(w <= delta, 1.0, 0.0)
    else:
        w_unclipped = w
        grad_unclipped = tl.full(w.shape, 1.0, tl.float32)
    grad_clipped = tl.where((w >= lo) & (w <= hi), 1.0, 0.0)
    v1 = w_unclipped * a
    v2 = w_clipped * a
    act = tl.where(v1 < v2, grad_unclipped, tl.where(v1 > v2, grad_clipped, 0.5 * (grad_unclipped + grad_clipped)))
    return w, w_unclipped, tl.minimum(v1, v2), act


@triton.jit
def _policy_weight(row_weight, normaliser, n_items, WEIGHTING: tl.constexpr):
    if WEIGHTING == 2:  # paper form: 1 / (B N n_k)
        return 1.0 / (normaliser * tl.maximum(n_items, 1.0))
    return tl.zeros_like(n_items) + row_weight


@triton.jit
def _token_terms(group_ptr, adv_ptr, bin_log_w_ptr, bin_count_ptr, base, t, T, row_weight, normaliser,
                 WEIGHTING: tl.constexpr):
    """A block of tokens: item ids, loss mask, advantages, their item's log-ratio and size, the policy weight."""
    group = tl.load(group_ptr + base + t, mask=t < T, other=-1)
    in_loss = group >= 0
    a = tl.load(adv_ptr + base + t, mask=in_loss, other=0.0).to(tl.float32)
    log_w = tl.load(bin_log_w_ptr + base + group, mask=in_loss, other=0.0)
    n_items = tl.load(bin_count_ptr + base + group, mask=in_loss, other=1.0)
    c = tl.where(in_loss, _policy_weight(row_weight, normaliser, n_items, WEIGHTING), 0.0)
    return group, in_loss, a, log_w, n_items, c


@triton.jit
def _segment_loss_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, group_ptr, num_bins_ptr, normaliser_ptr, tokens_ptr,
    bin_count_ptr, bin_log_w_ptr, bin_dloss_ptr, grad_ptr, row_sums_ptr,
    B, T, beta, lo, hi, delta, log_ratio_limit,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
    WEIGHTING: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    num_bins = tl.load(num_bins_ptr + row)
    normaliser = tl.load(normaliser_ptr)
    tokens = tl.load(tokens_ptr)

    # Pass 1: n_k and log w_k per item.
    row_tokens = 0.0
    for b0 in range(0, num_bins, BLOCK_B):
        bins = b0 + tl.arange(0, BLOCK_B)
        count = tl.zeros((BLOCK_B,), dtype=tl.float32)
        log_ratio_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            group = tl.load(group_ptr + base + t, mask=t < T, other=-1)
            hit = group[:, None] == bins[None, :]
            count += tl.sum(tl.where(hit, 1.0, 0.0), axis=0)
            if HAS_OLD:
                in_loss = group >= 0
                diff = tl.load(logp_ptr + base + t, mask=in_loss, other=0.0) - tl.load(old_ptr + base + t,
                                                                                        mask=in_loss, other=0.0)
                log_ratio_sum += tl.sum(tl.where(hit, diff[:, None], 0.0), axis=0)
        row_tokens += tl.sum(count, axis=0)
        bin_ok = bins < num_bins
        tl.store(bin_count_ptr + base + bins, count, mask=bin_ok)
        tl.store(bin_log_w_ptr + base + bins, log_ratio_sum / tl.maximum(count, 1.0), mask=bin_ok)
    tl.debug_barrier()

    if WEIGHTING == 0:  # grpo: 1 / (B M_i)
        row_weight = 1.0 / (B * tl.maximum(row_tokens, 1.0))
    else:
        row_weight = 1.0 / normaliser

    # Pass 2: dL/dw_k = sum_{t in k} c_t * (-a_t * act_t).
    for b0 in range(0, num_bins, BLOCK_B):
        bins = b0 + tl.arange(0, BLOCK_B)
        dloss = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            group, in_loss, a, log_w, n_items, c = _token_terms(
                group_ptr, adv_ptr, bin_log_w_ptr, bin_count_ptr, base, t, T, row_weight, normaliser, WEIGHTING)
            _, _, _, act = _item_terms(log_w, a, lo, hi, delta, log_ratio_limit, HAS_DELTA)
            hit = group[:, None] == bins[None, :]
            dloss += tl.sum(tl.where(hit, (-c * a * act)[:, None], 0.0), axis=0)
        tl.store(bin_dloss_ptr + base + bins, dloss, mask=bins < num_bins)
    tl.debug_barrier()

    # Pass 3: g_t, the row's loss and its statistics.
    loss = 0.0
    low = 0.0
    high = 0.0
    ratio = 0.0
    kl_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        group, in_loss, a, log_w, n_items, c = _token_terms(
            group_ptr, adv_ptr, bin_log_w_ptr, bin_count_ptr, base, t, T, row_weight, normaliser, WEIGHTING)
        dloss = tl.load(bin_dloss_ptr + base + group, mask=in_loss, other=0.0)
        w, w_unclipped, branch_min, _ = _item_terms(log_w, a, lo, hi, delta, log_ratio_limit, HAS_DELTA)
        unsaturated = tl.where(log_w <= log_ratio_limit, 1.0, 0.0)
        grad = tl.where(in_loss, dloss * w * unsaturated / tl.maximum(n_items, 1.0), 0.0)
        loss += tl.sum(-c * branch_min, axis=0)
        low += tl.sum(tl.where(in_loss & (w_unclipped < lo) & (a < 0), 1.0, 0.0), axis=0)
        high += tl.sum(tl.where(in_loss & (w_unclipped > hi) & (a > 0), 1.0, 0.0), axis=0)
        ratio += tl.sum(tl.where(in_loss, w, 0.0), axis=0)
        if HAS_REF:
            l = tl.load(logp_ptr + base + t, mask=in_loss, other=0.0)
            ref_minus_l = tl.load(ref_ptr + base + t, mask=in_loss, other=0.0) - l
            log_ref_ratio = tl.minimum(ref_minus_l, log_ratio_limit)
            ref_ratio = tl.exp(log_ref_ratio)
            kl = tl.where(in_loss, ref_ratio - log_ref_ratio - 1.0, 0.0)
            kl_sum += tl.sum(kl, axis=0)
            if ADD_KL:  # beta != 0 (0 * an infinite KL would be NaN)
                if WEIGHTING == 2:  # the paper form adds the token-mean KL
                    kl_weight = tl.where(in_loss, 1.0 / tokens, 0.0)
                else:
                    kl_weight = c
                loss += beta * tl.sum(kl_weight * kl, axis=0)
                grad += tl.where(ref_minus_l <= log_ratio_limit, beta * kl_weight * (1.0 - ref_ratio), 0.0)
        tl.store(grad_ptr + base + t, grad, mask=t < T)
    out = row_sums_ptr + row * 5
    tl.store(out, loss)
    tl.store(out + 1, low)
    tl.store(out + 2, high)
    tl.store(out + 3, ratio)
    tl.store(out + 4, kl_sum)


def segment_loss(batch: TokenBatch, cfg: LossConfig):
    """Same contract as ``rankgrpo_kernels.segment_loss.segment_loss``: (loss, stats, grad (B, T)) in fp32."""
    B, T = batch.mask.shape
    device = batch.mask.device
    f32 = dict(dtype=torch.float32, device=device)
    if B * T == 0:
        return torch.zeros((), **f32), torch.zeros(len(STAT_NAMES), **f32), torch.zeros(B, T, **f32)
    rows = torch.arange(B, device=device).unsqueeze(1) * T
    group = torch.where(batch.mask, batch.group - rows, -1).to(torch.int32).contiguous()
    num_bins = (group.amax(1) + 1).to(torch.int32)
    tokens = batch.mask.sum().clamp(min=1).to(torch.float32).reshape(1)
    logps = batch.logps.detach().to(torch.float32).contiguous()

    def operand(x):
        return logps if x is None else x.detach().to(torch.float32).contiguous()

    scratch = torch.empty(3, B * T, **f32)
    grad = torch.empty(B, T, **f32)
    row_sums = torch.empty(B, ROW_SUMS, **f32)
    _segment_loss_kernel[(B,)](
        logps, operand(batch.old_logps), operand(batch.ref_logps), operand(batch.advantages), group, num_bins,
        batch.normaliser.to(torch.float32).reshape(1), tokens, scratch[0], scratch[1], scratch[2], grad, row_sums,
        B, T, cfg.beta, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high,
        cfg.delta if cfg.delta is not None else 0.0, LOG_RATIO_LIMIT,
        HAS_OLD=batch.old_logps is not None, HAS_REF=batch.ref_logps is not None, ADD_KL=cfg.beta != 0.0,
        HAS_DELTA=cfg.delta is not None,
        WEIGHTING=WEIGHTING[cfg.loss_type], BLOCK_T=BLOCK_T, BLOCK_B=BLOCK_B,
    )
    loss, stats = loss_from_row_sums(row_sums, tokens[0], batch)
    return loss, stats, grad
