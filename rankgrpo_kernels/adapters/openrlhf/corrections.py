"""OpenRLHF 0.11's rollout importance-sampling correction (per token, sequence or item) as the loss's policy
weights."""

from __future__ import annotations

import torch

from ...importance import item_means


def rollout_is_weights(old_log_probs, rollout_log_probs, mask, item_ids, *, level: str, mode: str, gating: str,
                       threshold):
    """OpenRLHF 0.11's rollout correction as policy weights (B, A), and the fraction of units it filters.

    A unit is a token (``level="token"``), a sequence (``"seq"``) or an item (``"item"``); its statistic is the
    ratio ``r = pi_train / pi_rollout`` (its geometric mean over the unit) or, per token and then averaged over the
    unit, the binary KL or total variation between the two probabilities of the sampled token. ``mode="clip"``
    (token ratios only) clamps r into ``[low, high]``; ``"mask"`` keeps each token's own ratio on units whose
    statistic lies in ``[low, high]`` and 0 elsewhere. The fraction filtered is over units (per sequence at the
    sequence level, per loss token otherwise, as OpenRLHF reports it)."""
    low, high = threshold
    dtype = torch.promote_types(old_log_probs.dtype, torch.float32)
    log_ratio = (old_log_probs - rollout_log_probs).detach().to(dtype)
    m = mask.to(dtype)
    if gating == "ratio":
        per_token = log_ratio
    else:
        p = rollout_log_probs.detach().to(dtype).exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.detach().to(dtype).exp().clamp(1e-6, 1 - 1e-6)
        per_token = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if gating == "binary_kl"
                     else (p - q).abs())
    if level == "seq":
        stat = ((per_token * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(m)
    elif level == "item":
        stat = item_means(per_token, item_ids, mask)
    else:
        stat = per_token
    if gating == "ratio":
        stat = stat.exp()
    outside = (stat < low) | (stat > high)
    weights = stat.clamp(min=low, max=high) if mode == "clip" else torch.where(outside, 0.0, log_ratio.exp())
    if level == "seq":
        filtered = outside[:, 0].float().mean()
    else:
        filtered = (outside.float() * m).sum() / m.sum().clamp(min=1)
    return weights, filtered
