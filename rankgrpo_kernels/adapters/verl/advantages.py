"""The ``"rank_grpo"`` advantage estimator: packed per-rank rewards to packed per-rank group advantages."""

from __future__ import annotations

import numpy as np
import torch

from ...rewards import rank_advantages


def pack_rank_values(values: torch.Tensor, response_length: int) -> torch.Tensor:
    """(B, N) per-rank values -> (B, T) with ``values[:, k]`` in column k, zeros after: verl's token-level layout."""
    B, N = values.shape
    if N > response_length:
        raise ValueError(f"rec_num={N} exceeds the response length {response_length}")
    return torch.cat([values, values.new_zeros(B, response_length - N)], 1)


def _group_rows(index: np.ndarray) -> tuple[torch.Tensor, int]:
    """A permutation that makes the samples of each uid consecutive, and the group size G (equal for all)."""
    _, inverse, counts = np.unique(index, return_inverse=True, return_counts=True)
    if counts.min() != counts.max():
        raise ValueError(f"Rank-GRPO needs the same number of samples per prompt, got sizes {sorted(set(counts))}")
    return torch.from_numpy(np.argsort(inverse, kind="stable")), int(counts[0])


def compute_rank_grpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                                config=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator: packed per-rank rewards (B, T) -> packed per-rank group advantages (B, T).

    Rows with the same ``index`` (uid) form a group; ``rank_advantages`` normalises each column over it. Every
    column is normalised, so N is not needed here: the zeros after the N ranks stay zeros (0 / (0 + 1e-4)), and
    the loss hook reads the first N columns only.
    """
    order, group = _group_rows(index)
    order = order.to(token_level_rewards.device)
    adv = torch.empty_like(token_level_rewards, dtype=torch.float32)
    adv[order] = rank_advantages(token_level_rewards[order].float(), group)
    return adv, adv
