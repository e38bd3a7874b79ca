"""The torch backend: the row pass and the segment loss in plain torch ops, on any device and in float64 too.

It is the CPU path of ``lm_head`` (which runs the GEMMs for every backend) and the readable statement of what the
Triton (``kernels/``) and CUDA (``csrc/``) backends compute.

row_pass     over a chunk of raw logits ``acc = h W^T`` (C, V): ``z = S(s (acc + b)) / T`` (logit scale s, softcap
             ``S(u) = c tanh(u / c)`` or none), ``lse``, ``logp = z_y - lse``, the entropy ``-sum p log p`` and
             ``D = (onehot(y) - softmax(z)) S'(u)``, written over ``acc`` in place when the gradient dtype is the
             logits' (else into one new tensor). Four streaming passes over the chunk on a CPU (max, softmax in
             place, max of p, negate), plus bias, scale and softcap when given.
grad_pass    over the same logits, untouched since a statistics-only row pass: with per-row ``g = dL/dlogp`` and
             ``e = dL/dH`` (an entropy term), ``D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u)`` in place.
segment_loss the O(B T) loss with its analytic gradient ``g = dL/dlogp``, without autograd or host sync. With ``w``
             the item's ratio, ``n_k`` its masked token count, ``c_t`` the loss type's weight and ``pw_t`` the
             policy weights (1 when None):

    dL/dl_u = (w_k / n_k) [log w_k <= 20] sum_{t in k} c_t pw_t (-a_t act_t) + beta kw_u (1 - exp(r_u - l_u))

where ``act_t`` is the derivative of ``min(min(w, delta) a, clip(w) a) / a`` with respect to ``w``, split evenly
between the two branches on ties exactly as ``torch.min`` does (so ``act = 1`` inside the clip range).

Equivalent PyTorch (what the tests check)::

    logp = ((acc + b) / T).log_softmax(-1).gather(-1, y[:, None])[:, 0]
    logps.requires_grad_(); loss, _ = reference_loss_from_logps(logps, ...); g = torch.autograd.grad(loss, logps)
"""

from __future__ import annotations

import math

import torch

from ..contract import LOG_RATIO_LIMIT, LossConfig, TokenBatch

__all__ = ["row_pass", "grad_pass", "segment_loss"]


def _check_transform(logit_scale, softcap):
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap}")


def _transform_(acc, bias, inv_temperature, logit_scale, softcap):
    """``z = S(s (acc + b)) / T`` over ``acc`` in place, and ``S'(u)`` (a new (C, V) tensor; None without a
    softcap). Without a softcap one multiply by ``s / T`` (none when it is 1)."""
    _check_transform(logit_scale, softcap)
    z = acc
    if bias is not None:
        z.add_(bias.to(z.dtype))
    if softcap is None:
        if logit_scale * inv_temperature != 1.0:
            z.mul_(logit_scale * inv_temperature)
        return z, None
    z.mul_(logit_scale / softcap)  # x = u / c
    slope = torch.cosh(z).square_().reciprocal_()  # 1 - tanh(x)^2 = 1 / cosh(x)^2: 0 where cosh overflows
    z.tanh_().mul_(softcap * inv_temperature)
    return z, slope


def _target(targets, V):
    """(the target column clamped into [0, V), as (C, 1); whether it lies in [0, V))."""
    in_vocab = (targets >= 0) & (targets < V)
    return torch.where(in_vocab, targets, 0).long()[:, None], in_vocab


def row_pass(logits, bias, targets, inv_temperature, lse_in, grad_dtype, want_entropy, *, logit_scale=1.0,
             softcap=None):
    """logits (C, V) float32/64, overwritten; bias (V,) or None; targets (C,), outside [0, V): no target logit;
    lse_in (C,) or None: use it as the log-sum-exp (the entropy is then not formed); logit_scale a float, softcap
    a float > 0 or None: ``z = S(s (logits + b)) / T`` with ``S(u) = c tanh(u / c)`` (or u). Returns logp, lse,
    entropy (or None), ``D = (onehot(y) - softmax(z)) S'(u)`` in ``grad_dtype`` (or None): the caller scales its rows
    by ``g s / T``. With a softcap one more (C, V) temporary holds ``S'``."""
    z, slope = _transform_(logits, bias, inv_temperature, logit_scale, softcap)
    column, in_vocab = _target(targets, z.shape[1])
    target_logit = torch.where(in_vocab, z.gather(1, column)[:, 0], 0)
    entropy = None
    if lse_in is None:
        # softmax in place is the one CPU kernel that keeps each row in cache for max, exp, sum and scale; the
        # largest p = exp(max z - lse) >= 1/V gives lse back without underflow.
        row_max = z.amax(1)
        torch.softmax(z, 1, out=z)
        lse = row_max - torch.log(z.amax(1))
        if want_entropy:  # -sum p log p: one more (C, V) temporary, only when asked
            entropy = torch.special.entr(z).sum(1)
    else:  # a given (global) lse: exp(z - lse) is p already
        lse = lse_in.to(z.dtype)
        z.sub_(lse[:, None]).exp_()
    logp = target_logit - lse
    grad = None
    if grad_dtype is not None:
        z.neg_().scatter_add_(1, column, in_vocab.to(z.dtype)[:, None])
        if slope is not None:
            z.mul_(slope)
        grad = z if grad_dtype == z.dtype else z.to(grad_dtype)
    return logp, lse, entropy, grad


def grad_pass(logits, bias, targets, inv_temperature, lse, entropy, g, e, grad_dtype, *, logit_scale=1.0,
              softcap=None):
    """The gradient of a loss with an entropy term, over the logits (C, V) a statistics-only ``row_pass`` left
    untouched (overwritten here): per-row lse, entropy H, g = dL/dlogp and e = dL/dH, each (C,). Returns, in
    ``grad_dtype`` (over the logits when it is their dtype)::

        D' = [ g (onehot(y) - p) - e p (z - lse + H) ] S'(u)       p = exp(z - lse)

    that is ``dL/dz S'(u)``; the caller scales its rows by ``s / T``. Formed as ``g onehot - (g + e H) p +
    e entr(p)`` (``entr(p) = -p log p``, 0 at p = 0): rows with g = e = 0 are zeros. Equivalent PyTorch::

        z = S(s (logits + b)) / T;  p = (z - lse[:, None]).exp()
        D_ = (g[:, None] * (onehot - p) - e[:, None] * p * (z - lse[:, None] + H[:, None])) * slope
    """
    z, slope = _transform_(logits, bias, inv_temperature, logit_scale, softcap)
    column, in_vocab = _target(targets, z.shape[1])
    g, e, lse, entropy = (x.to(z.dtype) for x in (g, e, lse, entropy))
    p = z.sub_(lse[:, None]).exp_()
    p_log_p = torch.special.entr(p).mul_(e[:, None])
    p.mul_((g + e * entropy).neg_()[:, None]).add_(p_log_p)
    p.scatter_add_(1, column, (g * in_vocab)[:, None])
    if slope is not None:
        p.mul_(slope)
    return p if grad_dtype == p.dtype else p.to(grad_dtype)


# --- the segment loss ----------------------------------------------------------------------------------------------

def _bin_sum(values: torch.Tensor, group: torch.Tensor, num_bins: int) -> torch.Tensor:
    return torch.zeros(num_bins, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def segment_loss(batch: TokenBatch, cfg: LossConfig):
    """Loss (0-dim), statistics (len(STAT_NAMES),) in ``STAT_NAMES`` order, ``dL/dlogps`` (B, T), and the per-row
    counts of loss tokens clipped low and high (B, 2).

    Computed in float32, or float64 when the log-probs are float64; no autograd graph is built.
    """
    with torch.no_grad():
        return _segment_loss(batch, cfg)


def _segment_loss(batch: TokenBatch, cfg: LossConfig):
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

    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    w_clipped = w.clamp(lo, hi)
    w_unclipped = w if cfg.delta is None else w.clamp(max=cfg.delta)
    v1, v2 = w_unclipped * a, w_clipped * a
    policy = -torch.minimum(v1, v2)
    grad1 = torch.ones_like(w) if cfg.delta is None else (w <= cfg.delta).to(dtype)
    grad2 = ((w >= lo) & (w <= hi)).to(dtype)
    act = torch.where(v1 < v2, grad1, torch.where(v1 > v2, grad2, 0.5 * (grad1 + grad2)))

    tokens = batch.tokens.to(dtype)
    if cfg.loss_type == "grpo":
        row_tokens = batch.mask.sum(1).clamp(min=1).to(dtype)
        c = (1.0 / (batch.normaliser.to(dtype) * row_tokens)).repeat_interleave(T) * m
    elif cfg.loss_type == "rank":
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
        if cfg.beta != 0.0:
            kl_weight = m / tokens if cfg.loss_type == "rank" else c
            loss = loss + cfg.beta * (kl_weight * kl).sum()
            g = g + cfg.beta * kl_weight * (1 - ref_ratio) * (ref_minus_l <= LOG_RATIO_LIMIT).to(dtype)

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


