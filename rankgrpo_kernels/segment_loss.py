"""The O(N) segment loss with its analytic gradient: what every backend runs after the log-probs.

Given per-token log-probs this computes, without autograd and without a host synchronisation, the loss, the
statistics and ``g_t = dL/dl_t`` for every token, so that a fused backend can turn ``g`` into the gradients of the
LM head without ever keeping logits. The maths is the reference's (``reference.py``); with ``w`` the item's ratio,
``n_k`` its masked token count and ``c_t`` the loss type's weight:

    dL/dl_u = (w_k / n_k) * [log w_k <= 20] * sum_{t in k} c_t * (-a_t * act_t) + beta * kw_u * (1 - exp(r_u - l_u))

where ``act_t`` is the derivative of ``min(min(w, delta) a, clip(w) a) / a`` with respect to ``w``, split evenly
between the two branches on ties exactly as ``torch.min`` does (so ``act = 1`` inside the clip range).

Equivalent PyTorch (what the tests check)::

    logps.requires_grad_(); loss, _ = reference_loss_from_logps(logps, ...); g = torch.autograd.grad(loss, logps)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import LOG_RATIO_LIMIT, LOSS_TYPES, STAT_NAMES


# What the compiled segment-loss kernels (Triton and CUDA) take: the policy weighting of each loss type
# (0: 1 / (B M_i), 1: 1 / normaliser, 2: 1 / (normaliser n_k)) and the per-row sums they write
# (loss, clipped low, clipped high, ratio, KL).
WEIGHTING = {"grpo": 0, "bnpo": 1, "dr_grpo": 1, "dapo": 1, "rank": 2}
ROW_SUMS = 5


@dataclass(frozen=True)
class LossConfig:
    """The per-run settings of the Rank-GRPO objective (see ``rank_grpo_loss_from_logps`` for their meaning)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    loss_type: str = "bnpo"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not (0.0 <= self.epsilon_low < 1.0):
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low!r}")
        if not (0.0 <= self.epsilon_high < float("inf")):
            raise ValueError(f"epsilon_high must be finite and >= 0, got {self.epsilon_high!r}")
        if self.delta is not None and not (1.0 < self.delta < float("inf")):
            raise ValueError(f"delta must be None or a finite number > 1, got {self.delta!r}")
        if not (0.0 <= self.beta < float("inf")):
            raise ValueError(f"beta must be finite and >= 0, got {self.beta!r}")


@dataclass
class TokenBatch:
    """Token-level inputs of the segment loss, all (B, T) on one device.

    ``group`` holds dense group ids in [0, B*T) (one per distinct (row, item id)), -1 outside the loss;
    ``mask`` is True exactly where ``group >= 0``. ``normaliser`` is the scalar of the loss type
    (sum M for bnpo, B * L_max for dr_grpo, num_items_in_batch for dapo, B * N for rank; unused by grpo).
    """

    logps: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    advantages: torch.Tensor
    group: torch.Tensor
    mask: torch.Tensor
    normaliser: torch.Tensor
    entropy: torch.Tensor | None = None


def dense_groups(item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Map each distinct item id of a row to a dense id in [row*T, row*T + T); -1 where ``mask`` is False.

    Sorting each row keeps this free of host synchronisation and of any bound on the id values.
    """
    B, T = item_ids.shape
    key = torch.where(mask, item_ids.long(), torch.iinfo(torch.int64).max)
    sorted_key, order = key.sort(dim=1, stable=True)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, starts.long().cumsum(1) - 1)
    rows = torch.arange(B, device=item_ids.device).unsqueeze(1) * T
    return torch.where(mask, rank + rows, -1)


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


def stats_dict(stats: torch.Tensor, has_kl: bool, has_entropy: bool) -> dict[str, torch.Tensor]:
    """Name the entries of the statistics vector of ``segment_loss``, leaving out those that were not computed."""
    named = dict(zip(STAT_NAMES, stats.unbind(0)))
    if not has_kl:
        del named["kl"]
    if not has_entropy:
        del named["entropy"]
    return named


def loss_from_row_sums(row_sums: torch.Tensor, tokens: torch.Tensor, batch: TokenBatch):
    """(loss, stats) from the per-row sums (B, ROW_SUMS) that the compiled segment-loss kernels write; ``tokens``
    is the number of loss tokens, clamped to >= 1. Summing rows here keeps the reduction order fixed."""
    sums = row_sums.sum(0)
    low, high = sums[1] / tokens, sums[2] / tokens
    entropy_mean = torch.zeros_like(low)
    if batch.entropy is not None:
        entropy_mean = torch.where(batch.mask, batch.entropy.detach().to(sums.dtype), 0).sum() / tokens
    # The KL entry is 0 without ref_logps, and then not reported.
    return sums[0], torch.stack([low, high, low + high, sums[3] / tokens, sums[4] / tokens, entropy_mean])
