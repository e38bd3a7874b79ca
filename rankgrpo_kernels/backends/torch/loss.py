"""The torch backend's segment loss: the O(B T) loss with its analytic gradient ``g = dL/dlogp``, without autograd
or host sync. With ``w`` the item's ratio, ``n_k`` its masked token count, ``c_t`` the loss type's weight and
``pw_t`` the policy weights (1 when None)::

    dL/dl_u = (w_k / n_k) [log w_k <= 20] sum_{t in k} c_t pw_t (-a_t act_t) + beta kw_u (1 - exp(r_u - l_u))

where ``act_t`` is the derivative of ``min(min(w, delta) a, clip(w) a) / a`` with respect to ``w``, split evenly
between the two branches on ties exactly as ``torch.min`` does (so ``act = 1`` inside the clip range).
"""

from __future__ import annotations

import torch

from ...contract import LOG_RATIO_LIMIT, LossSpec, TokenBatch
from ..protocol import SegmentLoss


def _bin_sum(values: torch.Tensor, group: torch.Tensor, num_bins: int) -> torch.Tensor:
    return torch.zeros(num_bins, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def segment_loss(batch: TokenBatch, *, spec: LossSpec) -> SegmentLoss:
    """Loss (0-dim), statistics (len(STAT_NAMES),) in ``STAT_NAMES`` order, ``dL/dlogps`` (B, T), and the per-row
    counts of loss tokens clipped low and high (B, 2).

    Computed in float32, or float64 when the log-probs are float64; no autograd graph is built.
    """
    with torch.no_grad():
        return SegmentLoss(*_segment_loss(batch, spec))


def _segment_loss(batch: TokenBatch, spec: LossSpec):
    dtype = torch.promote_types(batch.logps.dtype, torch.float32)
    B, T = batch.logps.shape
    in_loss = batch.mask.reshape(-1)
    m = in_loss.to(dtype)
    group = batch.group.clamp(min=0).reshape(-1)  # tokens outside the loss sit in bin 0 with weight m = 0

    def masked(x):  # zero outside the loss with where, not a product: padding may hold NaN or inf
        return torch.where(in_loss, x.detach().to(dtype).reshape(-1), 0)

    l = masked(batch.logps)
    a = masked(batch.advantages)
    n_bin = _bin_sum(m, group, B * T)
    # On-policy (no old_logps) o = l, so every ratio is exactly 1, and a non-finite l still makes the loss NaN.
    o = l if batch.old_logps is None else masked(batch.old_logps)
    log_w_bin = _bin_sum(l - o, group, B * T) / n_bin.clamp(min=1)
    unsaturated = (log_w_bin <= LOG_RATIO_LIMIT).to(dtype)
    w_bin = torch.exp(log_w_bin.clamp(max=LOG_RATIO_LIMIT))
    w = w_bin[group]

    lo, hi = 1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high
    w_clipped = w.clamp(lo, hi)
    w_unclipped = w if spec.delta is None else w.clamp(max=spec.delta)
    v1, v2 = w_unclipped * a, w_clipped * a
    policy = -torch.minimum(v1, v2)
    grad1 = torch.ones_like(w) if spec.delta is None else (w <= spec.delta).to(dtype)
    grad2 = ((w >= lo) & (w <= hi)).to(dtype)
    act = torch.where(v1 < v2, grad1, torch.where(v1 > v2, grad2, 0.5 * (grad1 + grad2)))

    tokens = batch.tokens.to(dtype)
    if spec.loss_type == "grpo":
        row_tokens = batch.mask.sum(1).clamp(min=1).to(dtype)
        c = (1.0 / (batch.normaliser.to(dtype) * row_tokens)).repeat_interleave(T) * m
    elif spec.loss_type == "rank":
        c = m / (batch.normaliser.to(dtype) * n_bin[group].clamp(min=1))
    else:
        c = m / batch.normaliser.to(dtype)
    # the policy terms' weights: c times the policy weights (the KL term keeps c)
    cp = c if batch.policy_weights is None else c * masked(batch.policy_weights)
    loss = (cp * policy).sum()

    # dL/dw summed over each item, then dw/dl_u = w / n_k for each of its tokens.
    dloss_dw = _bin_sum(-cp * a * act, group, B * T)
    # where, not * m: tokens outside the loss read bin 0, which a NaN log-prob of a loss token may fill
    g = torch.where(in_loss, (dloss_dw * w_bin * unsaturated / n_bin.clamp(min=1))[group], 0)

    kl_mean = torch.zeros((), dtype=dtype, device=l.device)  # reported only when ref_logps are given
    if batch.ref_logps is not None:
        ref_minus_l = masked(batch.ref_logps) - l
        log_ref_ratio = ref_minus_l.clamp(max=LOG_RATIO_LIMIT)
        ref_ratio = torch.exp(log_ref_ratio)
        kl = (ref_ratio - log_ref_ratio - 1) * m
        kl_mean = kl.sum() / tokens
        if spec.beta != 0.0:
            kl_weight = m / tokens if spec.loss_type == "rank" else c
            loss = loss + spec.beta * (kl_weight * kl).sum()
            g = g + spec.beta * kl_weight * (1 - ref_ratio) * (ref_minus_l <= LOG_RATIO_LIMIT).to(dtype)

    low = ((w_unclipped < lo) & (a < 0)).to(dtype) * m
    high = ((w_unclipped > hi) & (a > 0)).to(dtype) * m
    entropy_mean = torch.zeros((), dtype=dtype, device=l.device)
    if batch.entropy is not None:
        entropy_mean = masked(batch.entropy).sum() / tokens
    stats = torch.stack(
        [low.sum() / tokens, high.sum() / tokens, (low + high).sum() / tokens, (w * m).sum() / tokens,
         kl_mean, entropy_mean]
    )
    return loss, stats, g.view(B, T), torch.stack([low.view(B, T).sum(1), high.view(B, T).sum(1)], 1)
