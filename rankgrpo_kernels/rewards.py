"""Per-rank values from reward outputs, per-rank rewards from hits, group advantages per rank, and the code form's
token advantages.

    exp_inf:  r[i,k] = rel[i,k]
    exp:      r[i,k] = sum_{j>=k} rel[i,j] / gamma^(j-k)                (gamma > 1)
    dcg:      r[i,k] = sum_{j>=k} rel[i,j] / log2(j+2)                  (0-based j, causal DCG@k:N)
    A[i,k] = (r[i,k] - mean_g r[g,k]) / (std_g r[g,k] + eps)            (unbiased std over the group)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .segments import Segments

REWARD_KINDS = ("exp_inf", "exp", "dcg")
ADVANTAGE_SCALES = ("group", "batch", "none")


def _check_float_matrix(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be (B, K), got shape {tuple(x.shape)}")


def rank_rewards(hits: torch.Tensor, kind: str = "exp_inf", gamma: float | None = None) -> torch.Tensor:
    """Per-rank rewards (B, K) from hits (B, K) in {0, 1} (any real relevance works too).

    Equivalent loop: ``r[:, k] = sum(hits[:, j] * discount(k, j) for j in range(k, K))``. Returns float32, or the
    floating dtype of ``hits``.
    """
    _check_float_matrix(hits, "hits")
    if kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
    rel = hits.to(hits.dtype if hits.dtype.is_floating_point else torch.float32)
    if torch.isnan(rel).any():
        raise ValueError("hits must not contain NaN")
    if kind == "exp_inf":
        if gamma is not None:
            raise ValueError("gamma is only used by kind='exp'")
        return rel.clone()
    K = rel.shape[1]
    j = torch.arange(K, dtype=torch.float64, device=rel.device)
    upper = j.unsqueeze(0) >= j.unsqueeze(1)  # [k, j]: j >= k
    if kind == "exp":
        if gamma is None or not (1.0 < gamma < math.inf):
            raise ValueError(f"kind='exp' needs a finite gamma > 1, got {gamma!r}")
        discount = torch.pow(float(gamma), -(j.unsqueeze(0) - j.unsqueeze(1)).clamp(min=0))
    else:
        if gamma is not None:
            raise ValueError("gamma is only used by kind='exp'")
        discount = (1.0 / torch.log2(j + 2)).unsqueeze(0).expand(K, K)
    weights = torch.where(upper, discount, 0.0).to(rel.dtype)  # [k, j]
    return rel @ weights.T


def per_rank_tensor(rows, rec_num: int, source: str = "hits") -> torch.Tensor:
    """(B, N) float32 tensor from one sequence of N numbers per completion (lists, tuples, arrays or a (B, N)
    tensor).

    Raises ``ValueError`` naming the first bad completion: None instead of a list, a single number, a list of
    another length than ``rec_num``, a None or NaN inside. There is no silent padding: a reward that cannot score a
    rank should say 0.0 for it.
    """
    if hasattr(rows, "tolist"):  # a tensor or an array
        rows = rows.tolist()
    values = []
    for i, row in enumerate(rows):
        if row is None:
            raise ValueError(f"{source} gave None for completion {i}; give {rec_num} per-rank values for every "
                             "completion (0.0 for ranks it cannot score)")
        if hasattr(row, "tolist"):
            row = row.tolist()
        if not isinstance(row, Sequence) or isinstance(row, str):
            raise ValueError(f"{source} gave {row!r} for completion {i}; Rank-GRPO needs one list of rec_num={rec_num} "
                             "per-rank values per completion, not one number")
        if len(row) != rec_num:
            raise ValueError(f"{source} gave {len(row)} values for completion {i}, expected rec_num={rec_num} "
                             "(pad missing ranks with 0.0, cut extra items)")
        for k, value in enumerate(row):
            if not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(f"{source} gave {value!r} at rank {k} of completion {i}; every per-rank value must "
                                 "be a real number (not None or NaN)")
        values.append([float(v) for v in row])
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), rec_num)


def rank_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages per rank: rows ``[g*G, (g+1)*G)`` are the G completions of prompt g.

    ``scale="group"`` divides by each group's unbiased std per rank (the paper), ``"batch"`` by the std over the
    whole batch per rank, ``"none"`` only centres. Shapes (B, K) -> (B, K); B must be a multiple of G >= 2.
    """
    _check_float_matrix(rewards, "rewards")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 2:
        raise ValueError(
            f"num_generations must be an int >= 2 (group advantages of one completion are undefined), got "
            f"{num_generations!r}"
        )
    B, K = rewards.shape
    if B % num_generations:
        raise ValueError(f"num_generations={num_generations} must divide the number of rows B={B}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.float()
    if torch.isnan(rewards).any():
        raise ValueError("rewards must not contain NaN")
    grouped = rewards.view(B // num_generations, num_generations, K)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(B, K)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(B, K)
    else:
        std = rewards.std(0, keepdim=True)
    return centred / (std + eps)


def token_advantages(
    rank_advantages: torch.Tensor,
    segments: Segments,
    *,
    length_shaping: bool = True,
    overflow_penalty: float = -0.1,
    end_of_list_bonus: float = 0.1,
    early_stop_penalty: float = -0.1,
) -> torch.Tensor:
    """The code form's per-token advantages (B, T) from per-rank advantages (B, N) and a segmentation.

    Tokens of item k < N take ``A[i, k]``; EOS and overflow tokens take 0. Length shaping then adds
    ``overflow_penalty`` to every overflow token, ``end_of_list_bonus`` to the EOS of a terminated row with exactly
    N items and no overflow, and ``early_stop_penalty`` to the EOS of a terminated row with fewer than N items.
    Each term can be set to 0, or all switched off with ``length_shaping=False``.
    """
    _check_float_matrix(rank_advantages, "rank_advantages")
    N = segments.max_items
    if rank_advantages.shape != (segments.item_ids.shape[0], N):
        raise ValueError(
            f"rank_advantages must be (B, max_items) = ({segments.item_ids.shape[0]}, {N}), got "
            f"{tuple(rank_advantages.shape)}"
        )
    adv = rank_advantages.to(segments.item_ids.device)
    if not adv.dtype.is_floating_point:
        adv = adv.float()
    per_token = adv.gather(1, segments.item_ids.clamp(0, N - 1)) * segments.content_mask
    if not length_shaping:
        return per_token
    return per_token + shaping_advantages(segments, overflow_penalty, end_of_list_bonus, early_stop_penalty, adv.dtype)


def shaping_advantages(segments: Segments, overflow_penalty: float, end_of_list_bonus: float,
                       early_stop_penalty: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The length-shaping terms (B, T) added to the code form's per-token advantages: ``overflow_penalty`` on every
    overflow token, ``end_of_list_bonus`` on the EOS of a terminated row with exactly N items and no overflow,
    ``early_stop_penalty`` on the EOS of a terminated row with fewer than N items."""
    N = segments.max_items
    # Both land on the EOS token, so rows that were cut off (no EOS) get neither.
    exact = (segments.items_emitted >= N) & ~segments.overflow_mask.any(1)
    early = segments.items_emitted < N
    eos_shaping = end_of_list_bonus * exact.to(dtype) + early_stop_penalty * early.to(dtype)
    return overflow_penalty * segments.overflow_mask.to(dtype) + eos_shaping.unsqueeze(1) * segments.eos_mask.to(dtype)
