"""The contract every layer shares: loss types and their policy terms, statistic names, limits, the token-level
batch and its checks.

``reference.py`` (the spec), the public API, the custom ops and every backend import these names from here, so that
the kernels and the spec can never disagree on a constant. Nothing here computes the loss. The two settings specs
that travel with a batch, ``LossSpec`` and ``HeadSpec``, are in ``specs.py``; a new per-token input is one
``TokenBatch`` field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# The log of every ratio (an item's mean log-ratio, r - l in the k3 KL) is clamped to at most this: e^20 ~ 4.9e8,
# far beyond any ratio PPO clipping lets through, so finite inputs stay finite.
LOG_RATIO_LIMIT = 20.0
# Each loss type and the weighting of its policy terms in the compiled segment-loss kernels (0: 1 / (normaliser M_i)
# with normaliser = B, 1: 1 / normaliser, 2: 1 / (normaliser n_k)); the normalisers are in ``inputs.normaliser``.
WEIGHTING = {"grpo": 0, "bnpo": 1, "dr_grpo": 1, "dapo": 1, "rank": 2, "luspo": 1, "sapo": 0, "cispo": 1,
             "vespo": 1}
LOSS_TYPES = tuple(WEIGHTING)
# Each loss type's policy term of its item ratio w (the kernels' POLICY; reference.py has the maths):
# 0 PPO's clipped surrogate -min(w' a, clip(w) a); 1 GMPO's -w a with the tokens' log-ratios clipped inside w (a
# PPO loss type with ratio_clip="token"); 2 SAPO's soft gate -(4 / tau) sigmoid(tau (w - 1)) a; from
# FIRST_REINFORCE on, REINFORCE terms with a detached weight (no gradient through w): 3 CISPO's
# -sg(min(w, epsilon_high)) a l, 4 VESPO's -sg(phi(W)) a l with W the item's product of token ratios.
POLICY = {name: {"sapo": 2, "cispo": 3, "vespo": 4}.get(name, 0) for name in LOSS_TYPES}
GMPO_POLICY = 1
FIRST_REINFORCE = 3
# The loss types normalised by num_items_in_batch: the loss tokens of TRL's accumulation window.
WINDOW_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")
# VESPO's clamp of log W from below (TRL's log(1e-8), after the authors' code) and of its lambdas.
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4
STAT_NAMES = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl", "entropy",
              "weight_mean")
# Per-row statistics (B,): the fractions of each row's loss tokens whose item ratio is clipped low / high (TRL logs
# their minimum and maximum over sequences). The segment loss returns their counts (B, 2), which chunks add up.
ROW_STAT_NAMES = ("clip_ratio_low_per_row", "clip_ratio_high_per_row")


@dataclass
class TokenBatch:
    """Token-level inputs of the segment loss, all (B, T) on one device.

    ``group`` holds dense group ids (one per distinct (row, item id)), -1 outside the loss; those of row b lie in
    [b*T, b*T + T), as ``dense_groups`` numbers them (``rows`` and ``row_relative_groups`` rely on it);
    ``mask`` is True exactly where ``group >= 0``. ``normaliser`` is the scalar of the loss type (B for grpo,
    sum M for bnpo, B * L_max for dr_grpo, num_items_in_batch for dapo, B * N for rank) and ``tokens`` the number
    of loss tokens (clamped to >= 1), both of the whole batch; ``policy_weights`` (or None: 1) multiply each
    token's policy term (not its KL term, not the statistics): a slice of rows (``rows``) keeps them, so its loss
    and statistics are its exact share of the batch's and the shares add up. ``entropy_mask`` (bool, or None: every
    loss token) marks the loss tokens the entropy bonus averages over.
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
    entropy_mask: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """Rows [start, stop) with their group ids rebased to the slice; normaliser and tokens stay the batch's."""
        T = self.mask.shape[1]
        per_token = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop]
                     for f in dataclasses.fields(self) if f.name not in ("normaliser", "tokens")}
        per_token["group"] = torch.where(per_token["mask"], per_token["group"] - start * T, -1)
        return TokenBatch(**per_token, normaliser=self.normaliser, tokens=self.tokens)


def check_tensor(x, name, shape=None, kind="float", device=None, optional=False):
    """Check type, dtype kind ('float' | 'int' | 'mask'), shape and device of one argument."""
    if x is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if kind == "mask" and (x.dtype.is_floating_point or x.dtype.is_complex):
        raise TypeError(f"{name} must be a bool or integer tensor (a mask), got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


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
               has_entropy: bool, computed: torch.Tensor | None = None, has_weight: bool = False
               ) -> dict[str, torch.Tensor]:
    """Name the entries of the statistics vector of ``segment_loss``, leaving out those that were not computed, and
    add the per-row clip fractions from its per-row clip counts (B, 2) and the loss mask (B, T) (0 for a row
    without loss tokens), and ``computed_tokens``: ``computed``, the number of loss tokens whose log-probs were
    computed (None: every loss token), over which ``ratio_mean`` and ``entropy`` are means; a mean of them over
    micro-batches or processes weights each by it; ``weight_mean`` (``has_weight``: ``LossSpec.reinforce``) is the
    token mean of the detached weight of the REINFORCE term. All detached."""
    named = dict(zip(STAT_NAMES, stats.detach().unbind(0)))
    row_clipped = row_clipped.detach()
    fractions = row_clipped / mask.sum(1, keepdim=True).clamp(min=1).to(row_clipped.dtype)
    named.update(zip(ROW_STAT_NAMES, fractions.unbind(1)))
    named["computed_tokens"] = (mask.sum() if computed is None else computed.detach()).to(stats.dtype)
    if not has_kl:
        del named["kl"]
    if not has_entropy:
        del named["entropy"]
    if not has_weight:
        del named["weight_mean"]
    return named
