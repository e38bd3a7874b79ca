"""The contract every layer shares: loss types, statistic names, limits, the loss settings and the token-level batch.

``reference.py`` (the spec), the public API and every backend import these names from here, so that the kernels
and the spec can never disagree on a constant. Nothing here computes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The log of every ratio (an item's mean log-ratio, r - l in the k3 KL) is clamped to at most this: e^20 ~ 4.9e8,
# far beyond any ratio PPO clipping lets through, so finite inputs stay finite.
LOG_RATIO_LIMIT = 20.0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "rank")
STAT_NAMES = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl", "entropy")
# Per-row statistics (B,): the fractions of each row's loss tokens whose item ratio is clipped low / high (TRL logs
# their minimum and maximum over sequences). The segment loss returns their counts (B, 2), which chunks add up.
ROW_STAT_NAMES = ("clip_ratio_low_per_row", "clip_ratio_high_per_row")

# What the compiled segment-loss kernels (Triton and CUDA) take: the policy weighting of each loss type
# (0: 1 / (normaliser M_i) with normaliser = B, 1: 1 / normaliser, 2: 1 / (normaliser n_k)) and the per-row sums
# they write (loss, clipped low, clipped high, ratio, KL).
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


@dataclass(frozen=True)
class LogitTransform:
    """How raw logits ``acc = h W^T`` become the policy's: ``z = S(logit_scale (acc + b)) / temperature`` with
    ``S(u) = softcap tanh(u / softcap)`` (the identity without a softcap; Gemma-2's final_logit_softcapping,
    Cohere's logit_scale). ``dz/dacc = logit_scale S'(u) / temperature``: the row pass writes D times ``S'(u)`` and
    the gradient GEMMs scale its rows by ``row_scale = logit_scale / temperature`` (times ``g``)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def row_scale(self) -> float:
        return self.logit_scale / self.temperature

    def kwargs(self) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap)


@dataclass
class TokenBatch:
    """Token-level inputs of the segment loss, all (B, T) on one device.

    ``group`` holds dense group ids (one per distinct (row, item id)), -1 outside the loss; those of row b lie in
    [b*T, b*T + T), as ``dense_groups`` numbers them (``rows`` and ``row_relative_groups`` rely on it);
    ``mask`` is True exactly where ``group >= 0``. ``normaliser`` is the scalar of the loss type (B for grpo,
    sum M for bnpo, B * L_max for dr_grpo, num_items_in_batch for dapo, B * N for rank) and ``tokens`` the number
    of loss tokens (clamped to >= 1), both of the whole batch; ``policy_weights`` (or None: 1) multiply each
    token's policy term (not its KL term, not the statistics): a slice of rows (``rows``) keeps them, so its loss
    and statistics are its exact share of the batch's and the shares add up.
    """

    logps: torch.Tensor | None
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    advantages: torch.Tensor
    group: torch.Tensor
    mask: torch.Tensor
    normaliser: torch.Tensor
    tokens: torch.Tensor
    entropy: torch.Tensor | None = None
    policy_weights: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """Rows [start, stop) with their group ids rebased to the slice; normaliser and tokens stay the batch's."""
        T = self.mask.shape[1]

        def take(x):
            return None if x is None else x[start:stop]

        mask = self.mask[start:stop]
        return TokenBatch(take(self.logps), take(self.old_logps), take(self.ref_logps), self.advantages[start:stop],
                          torch.where(mask, self.group[start:stop] - start * T, -1), mask, self.normaliser,
                          self.tokens, take(self.entropy), take(self.policy_weights))


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


def stats_dict(stats: torch.Tensor, row_clipped: torch.Tensor, mask: torch.Tensor, has_kl: bool,
               has_entropy: bool) -> dict[str, torch.Tensor]:
    """Name the entries of the statistics vector of ``segment_loss``, leaving out those that were not computed, and
    add the per-row clip fractions from its per-row clip counts (B, 2) and the loss mask (B, T) (0 for a row
    without loss tokens)."""
    named = dict(zip(STAT_NAMES, stats.unbind(0)))
    fractions = row_clipped / mask.sum(1, keepdim=True).clamp(min=1).to(row_clipped.dtype)
    named.update(zip(ROW_STAT_NAMES, fractions.unbind(1)))
    if not has_kl:
        del named["kl"]
    if not has_entropy:
        del named["entropy"]
    return named


def loss_from_row_sums(row_sums: torch.Tensor, batch: TokenBatch):
    """(loss, stats, per-row clip counts (B, 2)) from the per-row sums (B, ROW_SUMS) that the compiled segment-loss
    kernels write. Summing rows here keeps the reduction order fixed."""
    sums = row_sums.sum(0)
    tokens = batch.tokens.to(sums.dtype)
    low, high = sums[1] / tokens, sums[2] / tokens
    entropy_mean = torch.zeros_like(low)
    if batch.entropy is not None:
        entropy_mean = torch.where(batch.mask, batch.entropy.detach().to(sums.dtype), 0).sum() / tokens
    # The KL entry is 0 without ref_logps, and then not reported.
    stats = torch.stack([low, high, low + high, sums[3] / tokens, sums[4] / tokens, entropy_mean])
    return sums[0], stats, row_sums[:, 1:3].clone()  # not a view: op outputs own their storage


def row_relative_groups(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the compiled segment-loss kernels take: group ids relative to their row (int32 (B, T), -1 outside the
    loss) and the number of groups of each row (int32 (B,); the CUDA kernel sizes its per-item slots with it)."""
    B, T = batch.mask.shape
    rows = torch.arange(B, device=batch.mask.device).unsqueeze(1) * T
    group = torch.where(batch.mask, batch.group - rows, -1).to(torch.int32).contiguous()
    num_bins = (group.amax(1) + 1).to(torch.int32) if T else torch.zeros(B, dtype=torch.int32, device=group.device)
    return group, num_bins
