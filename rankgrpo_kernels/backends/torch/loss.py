"""The torch backend's segment loss: the O(B T) loss with its analytic gradient ``g = dL/dlogp``, without autograd
or host sync. With ``w`` the item's ratio, ``n_k`` its masked token count, ``c_t`` the loss type's weight and
``pw_t`` the policy weights (1 when None)::

    dL/dl_u = (w_k / n_k) [log w_k <= 20] sum_{t in k} c_t pw_t (-a_t act_t) + beta kw_u (1 - exp(r_u - l_u))

where ``act_t`` is the derivative of the policy term's ``-policy_t / a_t`` with respect to ``w``: for PPO's
``min(min(w, delta) a, clip(w) a) / a`` split evenly between the two branches on ties exactly as ``torch.min`` does
(so ``act = 1`` inside the clip range), for SAPO's gate ``4 s (1 - s)`` with ``s = sigmoid(tau (w - 1))``. The
REINFORCE terms (cispo, vespo) ``-sg(phi_t) a_t l_t`` reach each token directly:
``dL/dl_u = -c_u pw_u phi_u a_u`` (plus the KL term's). With ``use_bias_correction_kl`` the KL term is
``beta kw_t w_k KL_t``: its ``dL/dw`` joins the item's sum and its direct part is scaled by ``w_k``. With
``ratio_clip="token"`` (GMPO) ``w_k`` is the geometric mean of the clipped token ratios, ``act = 1``, and
``dw_k/dl_u`` is 0 for a token whose log-ratio was clipped.
"""

from __future__ import annotations

import torch

from ...contract import GMPO_POLICY, LOG_RATIO_LIMIT, VESPO_LOG_W_MIN, TokenBatch
from ...specs import LossSpec
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
    lo, hi = spec.clip_bounds
    x = l - o
    token_clip = spec.policy == GMPO_POLICY
    if token_clip:  # GMPO: each token's log-ratio clipped (log-space bounds) inside the item's mean
        x_raw = x
        x = torch.where(a > 0, x.clamp(max=hi), x.clamp(min=lo))
    log_ratio_bin = _bin_sum(x, group, B * T)
    log_w_bin = log_ratio_bin / n_bin.clamp(min=1)
    unsaturated = (log_w_bin <= LOG_RATIO_LIMIT).to(dtype)
    w_bin = torch.exp(log_w_bin.clamp(max=LOG_RATIO_LIMIT))
    w = w_bin[group]

    w_unclipped = w if spec.delta is None else w.clamp(max=spec.delta)
    policy_kind = spec.policy
    weight = torch.zeros_like(w)  # the REINFORCE term's detached weight
    if policy_kind == GMPO_POLICY:  # -w a with the clipped tokens' ratio; a clipped token's log-ratio: no gradient
        policy = -w * a
        act = torch.ones_like(w)
        kept = torch.where(a > 0, x_raw <= hi, x_raw >= lo).to(dtype)
    elif policy_kind == 0:  # PPO's clipped surrogate
        v1, v2 = w_unclipped * a, w.clamp(lo, hi) * a
        policy = -torch.minimum(v1, v2)
        grad1 = torch.ones_like(w) if spec.delta is None else (w <= spec.delta).to(dtype)
        grad2 = ((w >= lo) & (w <= hi)).to(dtype)
        act = torch.where(v1 < v2, grad1, torch.where(v1 > v2, grad2, 0.5 * (grad1 + grad2)))
    elif policy_kind == 2:  # SAPO's soft gate
        tau = torch.where(a > 0, *spec.sapo_temperatures).to(dtype)
        gate = torch.sigmoid(tau * (w - 1))
        policy = -gate * 4 / tau * a
        act = 4 * gate * (1 - gate)
    else:
        if policy_kind == 3:  # CISPO
            weight = w.clamp(max=hi)
        else:  # VESPO's gamma weight of the item's product ratio W
            log_big_w = log_ratio_bin.clamp(VESPO_LOG_W_MIN, LOG_RATIO_LIMIT)[group]
            k_pos, lam_pos, k_neg, lam_neg = spec.vespo_gamma
            nonneg = a >= 0
            k = torch.where(nonneg, k_pos, k_neg).to(dtype)
            lam = torch.where(nonneg, lam_pos, lam_neg).to(dtype)
            weight = torch.exp(lam + k * log_big_w - lam * torch.exp(log_big_w)).nan_to_num(0.0, 0.0, 0.0) * m
        policy = -weight * a * l

    tokens = batch.tokens.to(dtype)
    if spec.loss_type in ("grpo", "sapo"):
        row_tokens = batch.mask.sum(1).clamp(min=1).to(dtype)
        c = (1.0 / (batch.normaliser.to(dtype) * row_tokens)).repeat_interleave(T) * m
    elif spec.loss_type == "rank":
        c = m / (batch.normaliser.to(dtype) * n_bin[group].clamp(min=1))
    else:
        c = m / batch.normaliser.to(dtype)
    # the policy terms' weights: c times the policy weights (the KL term keeps c)
    cp = c if batch.policy_weights is None else c * masked(batch.policy_weights)
    loss = (cp * policy).sum()

    # g = direct + (dL/dw_k summed over each item) dw_k/dl_u, with dw_k/dl_u = w_k / n_k for each of its tokens
    dloss_dw = torch.zeros_like(w)
    if spec.reinforce:
        direct = -cp * weight * a
    else:
        direct = torch.zeros_like(w)
        dloss_dw = -cp * a * act

    kl_mean = torch.zeros((), dtype=dtype, device=l.device)  # reported only when ref_logps are given
    if batch.ref_logps is not None:
        ref_minus_l = masked(batch.ref_logps) - l
        log_ref_ratio = ref_minus_l.clamp(max=LOG_RATIO_LIMIT)
        ref_ratio = torch.exp(log_ref_ratio)
        kl = (ref_ratio - log_ref_ratio - 1) * m
        kl_ratio = w if spec.use_bias_correction_kl else 1.0  # the KL term weighted by the item ratio
        kl_mean = (kl * kl_ratio).sum() / tokens
        if spec.beta != 0.0:
            kl_weight = m / tokens if spec.loss_type == "rank" else c
            loss = loss + spec.beta * (kl_weight * kl * kl_ratio).sum()
            direct = direct + spec.beta * kl_weight * kl_ratio * (1 - ref_ratio) * (
                ref_minus_l <= LOG_RATIO_LIMIT).to(dtype)
            if spec.use_bias_correction_kl:
                dloss_dw = dloss_dw + spec.beta * kl_weight * kl
    # where, not * m: tokens outside the loss read bin 0, which a NaN log-prob of a loss token may fill
    through_ratio = (_bin_sum(dloss_dw, group, B * T) * w_bin * unsaturated / n_bin.clamp(min=1))[group]
    if token_clip:
        through_ratio = through_ratio * kept
    g = torch.where(in_loss, direct + through_ratio, 0)

    clipped_by = x_raw if token_clip else w_unclipped  # what the clip counts compare with lo and hi
    low = ((clipped_by < lo) & (a < 0)).to(dtype) * m
    high = ((clipped_by > hi) & (a > 0)).to(dtype) * m
    entropy_mean = torch.zeros((), dtype=dtype, device=l.device)
    if batch.entropy is not None:
        entropy_mean = masked(batch.entropy).sum() / tokens
    stats = torch.stack(
        [low.sum() / tokens, high.sum() / tokens, (low + high).sum() / tokens, (w * m).sum() / tokens,
         kl_mean, entropy_mean, (weight * m).sum() / tokens]
    )
    return loss, stats, g.view(B, T), torch.stack([low.view(B, T).sum(1), high.view(B, T).sum(1)], 1)
