"""The segment loss in one Triton program per row: item ratios, clipping, KL, the row's loss and statistics, and
``g = dL/dlogp``, in O(T) per row of T tokens (plus O(items)); every sum in a fixed order (deterministic, no
atomics, no host sync).

Row i holds T tokens with log-probs ``l``, old log-probs ``o``, reference log-probs ``r``, advantages ``a`` and
row-relative item ids ``k`` in [0, T) (one id per item of the row), -1 outside the loss, and optional policy
weights ``pw`` (1 when absent; they scale each token's policy term only). With ``n_k`` the item's token count,
``c_t`` the policy weight (``weighting`` 0: ``1 / (normaliser M_i)`` with M_i the row's loss tokens,
1: ``1 / normaliser``, 2: ``1 / (normaliser n_k)``) and ``lo, hi = clip_low, clip_high``:

    log w_k = mean_{t in k} x_t,  x = l - o       w_k = exp(min(log w_k, limit))        (o = l when old is None)
    the policy term -f_t (``POLICY``, ``contract.POLICY``):
      0 PPO:   f = min(v1, v2), v1 = min(w, delta) a, v2 = clip(w, lo, hi) a,
               act = d f / dw / a   (ties: the mean of both sides)
      1 GMPO:  x_t clipped inside the mean, min(x, hi) where a > 0, else max(x, lo) (log-space bounds); f = w a,
               act = 1, and dw_k/dl_t = 0 for a clipped token; its clip counts are of x
      2 SAPO:  f = (4 / tau) s a, s = sigmoid(tau (w - 1)), tau = tau_pos if a > 0 else tau_neg,  act = 4 s (1 - s)
      3 CISPO: f = phi a l, phi = min(w, hi)                                          (phi detached)
      4 VESPO: f = phi a l, phi = e^(lam + k log W - lam W), log W = clamp(n_k log w_k, log_w_min, limit),
               (k, lam) = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg); a non-finite phi is 0
    D_k = sum_{t in k} c_t pw_t (-a_t act_t)                              (dL/dw_k; PPO, GMPO and SAPO)
    g_t = D_k w_k [log w_k <= limit] / n_k  (PPO, GMPO, SAPO)   or   -c_t pw_t phi_t a_t   (CISPO, VESPO)
          + beta kw_t (1 - e^(r_t - l_t)) [r_t - l_t <= limit]
    ``KL_CORRECTED`` (TRL's use_bias_correction_kl): every KL_t above becomes w_k KL_t, and beta kw_t KL_t joins
    D_k (also for CISPO and VESPO, whose D_k is then that alone).
    row sums: sum_t -c_t pw_t f_t + beta kw_t KL_t,  #(min(w, delta) < lo, a < 0),
              #(min(w, delta) > hi, a > 0) (GMPO: x_t for min(w, delta)),  sum_t w_t,  sum_t KL_t,
              sum_t phi_t (0 for PPO, GMPO and SAPO)
              with KL = e^x - x - 1, x = min(r - l, limit), kw = c (weighting 2: 1 / tokens)

The launcher sorts each row's item ids stably (``torch.sort``, on the device), so that each item's tokens form one
contiguous run of the sorted order. Three passes walk the row in blocks of ``BLOCK_T`` tokens:

1. sorted order: a segmented scan (``tl.associative_scan`` keyed by item, the running sums of the previous block
   carried into the next) gives ``n_k`` and ``sum x`` at each run's last token, which writes its item's bin;
2. sorted order: the same scan of ``c_t (-a_t act_t)`` gives ``D_k`` (not for the REINFORCE terms, which have
   no gradient through the ratio, unless the corrected KL's);
3. token order: ``g_t`` and the row's six sums, reduced over rows afterwards by the caller.

The bins live in the scratch (3, B, T); no value is written twice and no bin is read before the pass that writes
it has ended (a barrier separates the passes). Per token the work is a constant (a ``log BLOCK_T`` scan).

Equivalent PyTorch of PPO's term (fp32; ``m = group >= 0``, ``k = group.clamp(min=0)``)::

    def per_item(x):  # (B, T) bins: the sum of x over each item's tokens
        return torch.zeros(B, T).scatter_add(1, k, torch.where(m, x, 0))
    n = per_item(torch.ones(B, T)).clamp(min=1)
    log_w = per_item(l - o) / n
    w = log_w.clamp(max=limit).exp()
    w_t, n_t = w.gather(1, k), n.gather(1, k)
    wu = w_t.clamp(max=delta)                         # w_t when delta is None
    v1, v2 = wu * a, w_t.clamp(lo, hi) * a
    d1, d2 = (w_t <= delta).float(), ((w_t >= lo) & (w_t <= hi)).float()   # d1 = 1 when delta is None
    f, act, phi = torch.minimum(v1, v2), torch.where(v1 < v2, d1, torch.where(v1 > v2, d2, (d1 + d2) / 2)), 0 # PPO
    c = m / normaliser * [1 / m.sum(1, keepdim=True).clamp(min=1), 1, 1 / n_t][weighting]
    x = (r - l).clamp(max=limit); kl = m * (x.exp() - x - 1); kw = m / tokens if weighting == 2 else c
    grad = m * (per_item(-c * pw * a * act) * w * (log_w <= limit) / n).gather(1, k)  # CISPO, VESPO: -c pw phi a
    grad += beta * kw * (1 - x.exp()) * (r - l <= limit)
    row_sums = torch.stack([(-c * pw * f + beta * kw * kl).sum(1), (m & (wu < lo) & (a < 0)).sum(1),
                            (m & (wu > hi) & (a > 0)).sum(1), (m * w_t).sum(1), kl.sum(1), (m * phi).sum(1)], 1)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..row_sums import ROW_SUMS


BLOCK_T = 256  # tokens per step of a row's program


@triton.jit
def _item_terms(log_w, n_items, a, lo, hi, delta, log_ratio_limit, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg,
                log_w_min, HAS_DELTA: tl.constexpr, POLICY: tl.constexpr):
    """Ratio, its delta-bounded form, the policy term's f / l (REINFORCE) or f, d f / dw / a (ties split as
    torch.min), and phi (0 for PPO and SAPO). Every min/max keeps a NaN (the hardware's drop it): a non-finite
    log-prob must make the loss NaN, as torch does."""
    w = tl.exp(tl.minimum(log_w, log_ratio_limit, propagate_nan=tl.PropagateNan.ALL))
    if HAS_DELTA:
        w_unclipped = tl.minimum(w, delta, propagate_nan=tl.PropagateNan.ALL)
        grad_unclipped = tl.where(w <= delta, 1.0, 0.0)
    else:
        w_unclipped = w
        grad_unclipped = tl.full(w.shape, 1.0, tl.float32)
    phi = tl.zeros_like(w)
    act = tl.zeros_like(w)
    if POLICY == 0:
        w_clipped = tl.minimum(tl.maximum(w, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                               propagate_nan=tl.PropagateNan.ALL)
        grad_clipped = tl.where((w >= lo) & (w <= hi), 1.0, 0.0)
        v1 = w_unclipped * a
        v2 = w_clipped * a
        act = tl.where(v1 < v2, grad_unclipped,
                       tl.where(v1 > v2, grad_clipped, 0.5 * (grad_unclipped + grad_clipped)))
        f = tl.minimum(v1, v2, propagate_nan=tl.PropagateNan.ALL)
    elif POLICY == 1:
        f = w * a
        act = tl.full(w.shape, 1.0, tl.float32)
    elif POLICY == 2:
        tau = tl.where(a > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (w - 1.0))
        f = 4.0 / tau * gate * a
        act = 4.0 * gate * (1.0 - gate)
    else:
        if POLICY == 3:
            phi = tl.minimum(w, hi, propagate_nan=tl.PropagateNan.ALL)
        else:
            log_big_w = tl.minimum(tl.maximum(log_w * n_items, log_w_min, propagate_nan=tl.PropagateNan.ALL),
                                   log_ratio_limit, propagate_nan=tl.PropagateNan.ALL)
            nonneg = a >= 0
            lam = tl.where(nonneg, lam_pos, lam_neg)
            phi = tl.exp(lam + tl.where(nonneg, k_pos, k_neg) * log_big_w - lam * tl.exp(log_big_w))
            phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)  # TRL's nan_to_num(0)
        f = phi * a  # times l
    return w, w_unclipped, f, act, phi


@triton.jit
def _gmpo_clip(x, a, lo, hi):
    """GMPO's clip of a token's log-ratio x: min(x, hi) where a > 0, else max(x, lo) (NaN kept)."""
    return tl.where(a > 0, tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL),
                    tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _k3(l, r, log_ratio_limit):
    """The k3 KL ``e^x - x - 1`` with ``x = min(r - l, limit)``, ``e^x``, and whether ``r - l`` is below the limit
    (its gradient's indicator)."""
    ref_minus_l = r - l
    log_ref_ratio = tl.minimum(ref_minus_l, log_ratio_limit, propagate_nan=tl.PropagateNan.ALL)
    ref_ratio = tl.exp(log_ref_ratio)
    return ref_ratio - log_ref_ratio - 1.0, ref_ratio, ref_minus_l <= log_ratio_limit


@triton.jit
def _kl_weight(c, in_loss, tokens, WEIGHTING: tl.constexpr):
    """kw: the loss type's weight c, or the token mean's for the paper form."""
    if WEIGHTING == 2:
        return tl.where(in_loss, 1.0 / tokens, 0.0)
    return c


@triton.jit
def _policy_weight(row_weight, normaliser, n_items, WEIGHTING: tl.constexpr):
    if WEIGHTING == 2:  # paper form: 1 / (normaliser n_k), normaliser = B N
        return 1.0 / (normaliser * tl.maximum(n_items, 1.0))
    return tl.zeros_like(n_items) + row_weight


@triton.jit
def _same_item_sums(item_a, count_a, sum_a, item_b, count_b, sum_b):
    """Segmented-scan combine over tokens sorted by item: an interval's summary is its last token's item and the
    sums over that item's tokens in it. Associative on sorted items (equal ends imply an equal middle)."""
    same = item_a == item_b
    return item_b, count_b + tl.where(same, count_a, 0.0), sum_b + tl.where(same, sum_a, 0.0)


@triton.jit
def _same_item_sum(item_a, sum_a, item_b, sum_b):
    """``_same_item_sums`` with one sum."""
    return item_b, sum_b + tl.where(item_a == item_b, sum_a, 0.0)


@triton.jit
def _sorted_block(sorted_ptr, order_ptr, base, s, T):
    """Sorted positions ``s`` of a row: their item (T past the row, which keeps the block sorted), whether the token
    is in the loss, its index in the row, and whether it ends its item's run."""
    item = tl.load(sorted_ptr + base + s, mask=s < T, other=T)
    next_item = tl.load(sorted_ptr + base + s + 1, mask=s + 1 < T, other=T)
    in_loss = (item >= 0) & (s < T)
    token = tl.load(order_ptr + base + s, mask=in_loss, other=0)
    return item, in_loss, token, in_loss & (item != next_item)


@triton.jit
def _last(x, BLOCK_T: tl.constexpr):
    """The last entry of a block."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_T) == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _segment_loss_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, pw_ptr, group_ptr, sorted_ptr, order_ptr, normaliser_ptr, tokens_ptr,
    bin_count_ptr, bin_log_w_ptr, bin_dloss_ptr, grad_ptr, row_sums_ptr,
    T, beta, lo, hi, delta, log_ratio_limit, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg, log_w_min,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_PW: tl.constexpr, WEIGHTING: tl.constexpr, POLICY: tl.constexpr, KL_CORRECTED: tl.constexpr,
    THROUGH_RATIO: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    normaliser = tl.load(normaliser_ptr)
    tokens = tl.load(tokens_ptr)
    head = tl.arange(0, BLOCK_T) == 0

    # Pass 1 (sorted order): n_k and log w_k at the end of each item's run.
    row_tokens = 0.0
    carry_item = -1
    carry_count = 0.0
    carry_sum = 0.0
    for s0 in range(0, T, BLOCK_T):
        item, in_loss, token, run_end = _sorted_block(sorted_ptr, order_ptr, base, s0 + tl.arange(0, BLOCK_T), T)
        count = tl.where(in_loss, 1.0, 0.0)
        row_tokens += tl.sum(count, axis=0)
        logp = tl.load(logp_ptr + base + token, mask=in_loss, other=0.0)
        if HAS_OLD:
            diff = logp - tl.load(old_ptr + base + token, mask=in_loss, other=0.0)
        else:  # on-policy: o = l, a ratio of exactly 1 that still turns a non-finite log-prob into a NaN loss
            diff = logp - logp
        if POLICY == 1:  # GMPO: each token's log-ratio clipped, sign-aware, inside the mean
            diff = _gmpo_clip(diff, tl.load(adv_ptr + base + token, mask=in_loss, other=0.0), lo, hi)
        continues = head & (item == carry_item)  # the previous block's last run goes on here
        count = tl.where(continues, count + carry_count, count)
        diff = tl.where(continues, diff + carry_sum, diff)
        _, count, diff = tl.associative_scan((item, count, diff), 0, _same_item_sums)
        tl.store(bin_count_ptr + base + item, count, mask=run_end)
        tl.store(bin_log_w_ptr + base + item, diff / tl.maximum(count, 1.0), mask=run_end)
        carry_item = tl.max(item, axis=0)
        carry_count = _last(count, BLOCK_T)
        carry_sum = _last(diff, BLOCK_T)
    tl.debug_barrier()

    if WEIGHTING == 0:  # grpo: 1 / (normaliser M_i)
        row_weight = 1.0 / (normaliser * tl.maximum(row_tokens, 1.0))
    else:
        row_weight = 1.0 / normaliser

    # Pass 2 (sorted order): D_k = sum_{t in k} dL/dw_k at the end of each item's run (THROUGH_RATIO: the policy
    # term's c_t pw_t (-a_t act_t) unless a REINFORCE term, the corrected KL's beta kw_t KL_t with KL_CORRECTED).
    carry_item = -1
    carry_sum = 0.0
    for s0 in range(0, T if THROUGH_RATIO else 0, BLOCK_T):
        item, in_loss, token, run_end = _sorted_block(sorted_ptr, order_ptr, base, s0 + tl.arange(0, BLOCK_T), T)
        a = tl.load(adv_ptr + base + token, mask=in_loss, other=0.0)
        log_w = tl.load(bin_log_w_ptr + base + item, mask=in_loss, other=0.0)
        n_items = tl.load(bin_count_ptr + base + item, mask=in_loss, other=1.0)
        c = tl.where(in_loss, _policy_weight(row_weight, normaliser, n_items, WEIGHTING), 0.0)
        cp = c
        if HAS_PW:
            cp = c * tl.load(pw_ptr + base + token, mask=in_loss, other=0.0)
        dloss = tl.zeros_like(c)
        if POLICY < 3:
            _, _, _, act, _ = _item_terms(log_w, n_items, a, lo, hi, delta, log_ratio_limit, tau_pos, tau_neg, k_pos,
                                          lam_pos, k_neg, lam_neg, log_w_min, HAS_DELTA, POLICY)
            dloss = -cp * a * act
        if KL_CORRECTED:
            kl, _, _ = _k3(tl.load(logp_ptr + base + token, mask=in_loss, other=0.0),
                           tl.load(ref_ptr + base + token, mask=in_loss, other=0.0), log_ratio_limit)
            dloss += tl.where(in_loss, beta * _kl_weight(c, in_loss, tokens, WEIGHTING) * kl, 0.0)
        dloss = tl.where(head & (item == carry_item), dloss + carry_sum, dloss)
        _, dloss = tl.associative_scan((item, dloss), 0, _same_item_sum)
        tl.store(bin_dloss_ptr + base + item, dloss, mask=run_end)
        carry_item = tl.max(item, axis=0)
        carry_sum = _last(dloss, BLOCK_T)
    tl.debug_barrier()

    # Pass 3 (token order): g_t, the row's loss and its statistics.
    loss = 0.0
    low = 0.0
    high = 0.0
    ratio = 0.0
    kl_sum = 0.0
    phi_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        group = tl.load(group_ptr + base + t, mask=t < T, other=-1)
        in_loss = group >= 0
        a = tl.load(adv_ptr + base + t, mask=in_loss, other=0.0)
        log_w = tl.load(bin_log_w_ptr + base + group, mask=in_loss, other=0.0)
        n_items = tl.load(bin_count_ptr + base + group, mask=in_loss, other=1.0)
        c = tl.where(in_loss, _policy_weight(row_weight, normaliser, n_items, WEIGHTING), 0.0)
        w, w_unclipped, f, _, phi = _item_terms(log_w, n_items, a, lo, hi, delta, log_ratio_limit, tau_pos, tau_neg,
                                                k_pos, lam_pos, k_neg, lam_neg, log_w_min, HAS_DELTA, POLICY)
        cp = c
        if HAS_PW:
            cp = c * tl.load(pw_ptr + base + t, mask=in_loss, other=0.0)
        if HAS_REF or POLICY >= 1:
            l = tl.load(logp_ptr + base + t, mask=in_loss, other=0.0)
        grad = tl.zeros_like(w)
        if POLICY >= 3:  # REINFORCE: -cp phi a l, its gradient token by token
            grad = tl.where(in_loss, -cp * f, 0.0)
            f = f * l
            phi_sum += tl.sum(tl.where(in_loss, phi, 0.0), axis=0)
        clipped_by = w_unclipped  # what the clip counts compare with lo and hi: GMPO's token log-ratio
        if POLICY == 1:
            clipped_by = l - l
            if HAS_OLD:
                clipped_by = l - tl.load(old_ptr + base + t, mask=in_loss, other=0.0)
        if THROUGH_RATIO:
            dloss = tl.load(bin_dloss_ptr + base + group, mask=in_loss, other=0.0)
            unsaturated = tl.where(log_w <= log_ratio_limit, 1.0, 0.0)
            if POLICY == 1:  # a token whose log-ratio was clipped gets no gradient through w
                unsaturated = tl.where(_gmpo_clip(clipped_by, a, lo, hi) == clipped_by, unsaturated, 0.0)
            grad += tl.where(in_loss, dloss * w * unsaturated / tl.maximum(n_items, 1.0), 0.0)
        loss += tl.sum(tl.where(in_loss, -cp * f, 0.0), axis=0)
        low += tl.sum(tl.where(in_loss & (clipped_by < lo) & (a < 0), 1.0, 0.0), axis=0)
        high += tl.sum(tl.where(in_loss & (clipped_by > hi) & (a > 0), 1.0, 0.0), axis=0)
        ratio += tl.sum(tl.where(in_loss, w, 0.0), axis=0)
        if HAS_REF:
            kl, ref_ratio, below_limit = _k3(l, tl.load(ref_ptr + base + t, mask=in_loss, other=0.0), log_ratio_limit)
            kl = tl.where(in_loss, kl, 0.0)
            kl_ratio = tl.full(w.shape, 1.0, tl.float32)
            if KL_CORRECTED:  # the KL weighted by the item ratio
                kl_ratio = w
            kl_sum += tl.sum(kl * kl_ratio, axis=0)
            if ADD_KL:  # beta != 0 (0 * an infinite KL would be NaN)
                kl_weight = _kl_weight(c, in_loss, tokens, WEIGHTING)
                loss += beta * tl.sum(kl_weight * kl * kl_ratio, axis=0)
                grad += tl.where(below_limit, beta * kl_weight * kl_ratio * (1.0 - ref_ratio), 0.0)
        tl.store(grad_ptr + base + t, grad, mask=t < T)
    out = row_sums_ptr + row * 6  # ROW_SUMS (the literal keeps the kernel free of globals)
    tl.store(out, loss)
    tl.store(out + 1, low)
    tl.store(out + 2, high)
    tl.store(out + 3, ratio)
    tl.store(out + 4, kl_sum)
    tl.store(out + 5, phi_sum)


def segment_loss_rows(logps, old_logps, ref_logps, advantages, group, normaliser, tokens, *, beta, clip_low,
                      clip_high, delta, weighting, log_ratio_limit, policy_weights=None, policy=0,
                      temperatures=(1.0, 1.0), gamma=(0.0, 1.0, 0.0, 1.0), log_w_min=0.0, kl_corrected=False):
    """Per-token gradient and per-row sums of the segment loss, from plain tensors on one device.

    logps, advantages (B, T) float; old_logps, ref_logps (B, T) float or None (on-policy; no KL); policy_weights
    (B, T) float or None (1); group (B, T) int
    row-relative item ids in [0, T), -1 outside the loss; normaliser and tokens one-element tensors (the loss type's
    normaliser; the loss tokens of the batch, >= 1); clip_low, clip_high the clip range of the ratio
    (1 - eps_low, 1 + eps_high; CISPO: 0, eps_high; GMPO: -eps_low, eps_high of the token log-ratios); delta a
    float or None; weighting 0 (grpo), 1 (a token sum over a normaliser), 2 (rank); policy 0 (PPO), 1 (GMPO),
    2 (SAPO, with temperatures (tau_pos, tau_neg)), 3 (CISPO), 4 (VESPO, with gamma (k_pos, lam_pos, k_neg,
    lam_neg) and log_w_min, the lower clamp of log W); kl_corrected:
    the KL weighted by the item ratio (its term, gradient through w and statistic; needs ref_logps).
    Rows are independent: a slice of a batch's rows gets its share of the batch's sums when ``normaliser`` and
    ``tokens`` are the whole batch's.

    Returns grad (B, T) fp32 (``dL/dlogps``) and row_sums (B, 6) fp32 (loss, clipped low, clipped high, ratio, KL,
    phi).
    """
    B, T = group.shape
    f32 = dict(dtype=torch.float32, device=group.device)
    if B * T == 0:
        return torch.zeros(B, T, **f32), torch.zeros(B, ROW_SUMS, **f32)
    group = group.to(torch.int32).contiguous()
    sorted_group, order = group.sort(dim=1, stable=True)  # each item one contiguous run; stable: deterministic

    def operand(x):
        return x.detach().to(torch.float32).contiguous()

    logps = operand(logps)
    grad, row_sums = torch.empty(B, T, **f32), torch.empty(B, ROW_SUMS, **f32)
    _segment_loss_kernel[(B,)](
        logps, logps if old_logps is None else operand(old_logps), logps if ref_logps is None else operand(ref_logps),
        operand(advantages), logps if policy_weights is None else operand(policy_weights), group, sorted_group,
        order.to(torch.int32), operand(normaliser).reshape(1), operand(tokens).reshape(1),
        *torch.empty(3, B, T, **f32), grad, row_sums,
        T, beta, clip_low, clip_high, 0.0 if delta is None else delta, log_ratio_limit, *temperatures, *gamma,
        log_w_min, HAS_OLD=old_logps is not None, HAS_REF=ref_logps is not None, ADD_KL=beta != 0.0,
        HAS_DELTA=delta is not None, HAS_PW=policy_weights is not None, WEIGHTING=weighting, POLICY=policy,
        KL_CORRECTED=kl_corrected, THROUGH_RATIO=policy < 3 or kl_corrected and beta != 0.0, BLOCK_T=BLOCK_T,
    )
    return grad, row_sums
