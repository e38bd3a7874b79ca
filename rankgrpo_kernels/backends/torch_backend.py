"""The torch backend: log-probs of the LM head chunk by chunk, never more than one bounded tile of logits.

With ``z = (h W^T + b) / T`` for N tokens and V vocabulary rows:

forward   one pass over (token chunk x vocabulary chunk) tiles keeps a running max ``m``, ``s = sum exp(z - m)``
          and, for the entropy, ``sum exp(z - m) z``; ``lse = m + log s``, ``logp = z_y - lse``.
backward  given ``g = dL/dlogp`` it recomputes the tiles for the tokens with ``g != 0`` only and forms
          ``dZ = g (onehot(y) - softmax(z)) / T``, ``dh = dZ W``, ``dW = dZ^T h``, ``db = sum dZ``.

Equivalent PyTorch (what it replaces)::

    z = (hidden @ weight.T + bias).float() / T
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]

Tiles are float32 (float64 for float64 inputs); GEMMs run in the input dtype with the results accumulated in
float32, and each gradient is cast once at the end.
"""

from __future__ import annotations

import torch

from ..contract import LOG_RATIO_LIMIT, LossConfig, TokenBatch
from ..settings import plan_chunks

__all__ = ["logprob_forward", "logprob_backward", "segment_loss"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _logits_tile(h, weight, bias, v0, v1, inv_temperature, acc):
    z = (h @ weight[v0:v1].T).to(acc)
    if bias is not None:
        z += bias[v0:v1].to(acc)
    return z.mul_(inv_temperature)


def logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy=False):
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> logp, lse, entropy-or-None, each (N,).

    A target outside [0, V) (one in another rank's vocabulary shard) has target logit 0: logp = -lse.
    """
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    acc_bytes = torch.finfo(acc).bits // 8
    live_tiles = 3 if return_entropy else 2  # logits and their exponentials (and p * z)
    token_chunk, vocab_chunk = plan_chunks(N, V, budget_bytes, live_tiles * acc_bytes)
    lse = torch.empty(N, dtype=acc, device=hidden.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty(N, dtype=acc, device=hidden.device) if return_entropy else None
    for t0 in range(0, N, token_chunk):
        h = hidden[t0 : t0 + token_chunk]
        running_max = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
        sum_exp = torch.zeros_like(running_max)
        sum_exp_z = torch.zeros_like(running_max) if return_entropy else None
        for v0 in range(0, V, vocab_chunk):
            z = _logits_tile(h, weight, bias, v0, v0 + vocab_chunk, inv_t, acc)
            new_max = torch.maximum(running_max, z.amax(1))
            rescale = torch.exp(running_max - new_max)
            if return_entropy:
                sum_exp_z = sum_exp_z * rescale + (torch.exp(z - new_max[:, None]) * z).sum(1)
            sum_exp = sum_exp * rescale + torch.exp_(z.sub_(new_max[:, None])).sum(1)
            running_max = new_max
        lse[t0 : t0 + token_chunk] = running_max + torch.log(sum_exp)
        if return_entropy:
            entropy[t0 : t0 + token_chunk] = lse[t0 : t0 + token_chunk] - sum_exp_z / sum_exp
        # The target logit from the target's weight row: a dot product per token, no tile needed.
        y = targets[t0 : t0 + token_chunk]
        in_vocab = (y >= 0) & (y < V)
        y = y.clamp(0, V - 1)
        target_logit = (h.unsqueeze(1) @ weight[y].unsqueeze(2)).view(-1).to(acc)
        if bias is not None:
            target_logit += bias[y].to(acc)
        target_logit = torch.where(in_vocab, target_logit, 0)
        logp[t0 : t0 + token_chunk] = target_logit * inv_t - lse[t0 : t0 + token_chunk]
    return logp, lse, entropy


def logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] * logp[t]``; ``needs`` says which to form.

    Only the tokens with ``grad_logp != 0`` are recomputed (one host sync to count them).
    """
    need_h, need_w, need_b = needs
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    active = grad_logp.nonzero().squeeze(1)
    h, y = hidden[active], targets[active]
    coef = grad_logp[active].to(acc) * inv_t  # dZ = coef * (onehot(y) - p)
    lse_active = lse[active].to(acc)
    n_active = active.numel()

    d_hidden = torch.zeros(n_active, hidden.shape[1], dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros_like(weight) if need_w else None
    d_bias = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    if n_active:
        acc_bytes, in_bytes = torch.finfo(acc).bits // 8, hidden.element_size()
        # Live: the logits tile (reused for dZ) and its cast; per vocabulary row the fp32 d_weight slab and the
        # product that is added into it.
        token_chunk, vocab_chunk = plan_chunks(n_active, V, budget_bytes, acc_bytes + in_bytes,
                                               hidden.shape[1] * (acc_bytes + in_bytes) if need_w else 0)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            d_weight_tile = torch.zeros(v1 - v0, weight.shape[1], dtype=acc, device=weight.device) if need_w else None
            for t0 in range(0, n_active, token_chunk):
                t1 = min(n_active, t0 + token_chunk)
                z = _logits_tile(h[t0:t1], weight, bias, v0, v1, inv_t, acc)
                d_z = torch.exp_(z.sub_(lse_active[t0:t1, None])).mul_(-coef[t0:t1, None])  # -coef * p
                in_tile = (y[t0:t1] >= v0) & (y[t0:t1] < v1)
                d_z.scatter_add_(1, (y[t0:t1] - v0).clamp(0, v1 - v0 - 1)[:, None], (coef[t0:t1] * in_tile)[:, None])
                if need_b:
                    d_bias[v0:v1] += d_z.sum(0)
                d_z = d_z.to(hidden.dtype)
                if need_h:
                    d_hidden[t0:t1] += d_z @ weight[v0:v1]
                if need_w:
                    d_weight_tile += d_z.T @ h[t0:t1]
            if need_w:
                d_weight[v0:v1] = d_weight_tile.to(weight.dtype)

    if need_h:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, active, d_hidden.to(hidden.dtype))
    if need_b:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


# --- the segment loss ------------------------------------------------------------------------------------------
#The O(N) segment loss with its analytic gradient: what every backend runs after the log-probs.
#
# Given per-token log-probs this computes, without autograd and without a host synchronisation, the loss, the
# statistics and ``g_t = dL/dl_t`` for every token, so that a fused backend can turn ``g`` into the gradients of the
# LM head without ever keeping logits. The maths is the reference's (``reference.py``); with ``w`` the item's ratio,
# ``n_k`` its masked token count and ``c_t`` the loss type's weight:
#
#     dL/dl_u = (w_k / n_k) * [log w_k <= 20] * sum_{t in k} c_t * (-a_t * act_t) + beta * kw_u * (1 - exp(r_u - l_u))
#
# where ``act_t`` is the derivative of ``min(min(w, delta) a, clip(w) a) / a`` with respect to ``w``, split evenly
# between the two branches on ties exactly as ``torch.min`` does (so ``act = 1`` inside the clip range).
#
# Equivalent PyTorch (what the tests check)::
#
#     logps.requires_grad_(); loss, _ = reference_loss_from_logps(logps, ...); g = torch.autograd.grad(loss, logps)
# 

def _bin_sum(values: torch.Tensor, group: torch.Tensor, num_bins: int) -> torch.Tensor:
    return torch.zeros(num_bins, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def segment_loss(batch: TokenBatch, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (0-dim), statistics (len(STAT_NAMES),) in ``STAT_NAMES`` order, and ``dL/dlogps`` (B, T).

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
    if batch.old_logps is None:  # on-policy: o = l.detach(), so every ratio is exactly 1
        log_w_bin = torch.zeros_like(n_bin)
    else:
        log_w_bin = _bin_sum(l - masked(batch.old_logps), group, B * T) / n_bin.clamp(min=1)
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

    tokens = m.sum().clamp(min=1)
    if cfg.loss_type == "grpo":
        row_tokens = batch.mask.sum(1).clamp(min=1).to(dtype)
        c = (1.0 / (B * row_tokens)).repeat_interleave(T) * m
    elif cfg.loss_type == "rank":
        c = m / (batch.normaliser.to(dtype) * n_bin[group].clamp(min=1))
    else:
        c = m / batch.normaliser.to(dtype)
    loss = (c * policy).sum()

    # dL/dw summed over each item, then dw/dl_u = w / n_k for each of its tokens.
    dloss_dw = _bin_sum(-c * a * act, group, B * T)
    g = (dloss_dw * w_bin * unsaturated / n_bin.clamp(min=1))[group] * m

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
    return loss, stats, g.view(B, T)


