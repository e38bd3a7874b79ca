"""What the loss optimises, as one spec: per-rank rewards and advantages (Rank-GRPO) or one reward per list (the GRPO
and GSPO baselines), and the unit of the importance ratio (item, token or sequence).

The loss takes per-token advantages and item ids; tokens of a row that share an id share one ratio, the geometric
mean of their token ratios (``reference.py``). Each row of the paper's comparison is a choice of those two tensors
for the same kernels, so every backend runs every row:

=============================  =========================  ===========  ============================================
paper row                      importance_sampling_level  list_reward  ratio and advantage of a token of item k
=============================  =========================  ===========  ============================================
Rank-GRPO                      ``"item"`` (default)       None         item k's geometric mean; ``A[i, k]``
ablation: ratio per token      ``"token"``                None         the token's own ratio; ``A[i, k]``
ablation: ratio per sequence   ``"sequence"``             None         the completion's geometric mean; ``A[i, k]``
GRPO with a list reward        ``"token"``                ``"dcg"``    the token's own ratio; ``A_i``
GSPO with a list reward        ``"sequence"``             ``"dcg"``    the completion's geometric mean; ``A_i``
=============================  =========================  ===========  ============================================

``A[i, k]`` is the group advantage of rank k (``rank_advantages`` over the G completions of a prompt), ``A_i`` the
group advantage of the list reward ``R_i`` of completion i:

    dcg:  R_i = sum_k r[i, k] / log2(k + 2)     (0-based k; with hits as rewards, the list's DCG@N)
    sum:  R_i = sum_k r[i, k]

from the per-rank rewards ``r`` (after ``reward_kind``). NDCG divides DCG by an ideal DCG that depends on the prompt
only, so within a group it rescales every reward alike and ``scale_rewards="group"`` gives NDCG's advantages (up to
the ``eps`` added to the std); ``"dcg"`` stands for both.

Which tokens are in the loss does not depend on the row: the code form (``loss_type`` grpo, bnpo, dr_grpo, dapo)
takes every completion token (items, EOS, overflow; ``Segments.item_ids``), the paper form (``"rank"``) the items'
tokens. A sequence ratio is the geometric mean over those tokens of the row, as in the authors' trainer
(``importance_sampling_level="sequence"``). Length shaping, when on, adds its terms to every row's per-token
advantages alike, so the rows differ only in ratio and advantage. The paper form averages each item's term over the
item's tokens, which only an item ratio with per-rank advantages defines: it refuses the other rows.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .rewards import (
    ADVANTAGE_SCALES, REWARD_KINDS, rank_advantages, rank_rewards, shaping_advantages, token_advantages,
)
from .segments import Segments

IMPORTANCE_SAMPLING_LEVELS = ("item", "token", "sequence")
LIST_REWARDS = ("dcg", "sum")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def list_rewards(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """One reward per list (B,) from per-rank rewards (B, N): ``kind="dcg"`` weights rank k (0-based) by
    ``1 / log2(k + 2)``, ``"sum"`` adds the ranks up."""
    if kind not in LIST_REWARDS:
        raise ValueError(f"list_reward must be one of {LIST_REWARDS} or None, got {kind!r}")
    if kind == "sum":
        return rewards.sum(1)
    ranks = torch.arange(rewards.shape[1], dtype=torch.float64, device=rewards.device)
    return rewards @ (1.0 / torch.log2(ranks + 2)).to(rewards.dtype)


@dataclass(frozen=True)
class ObjectiveSpec:
    """How rewards become the loss's per-token advantages and item ids (module docstring).

    reward_kind, reward_gamma  per-rank rewards from the reward's per-rank values (``rank_rewards``).
    scale_rewards              the advantages' scale: "group", "batch" or "none" (``rank_advantages``).
    multi_objective_aggregation  several reward functions: "sum_then_normalize" (their weighted sum's group
                               advantages) or "normalize_then_sum" (GDPO: each function's group advantages,
                               weighted and summed, then normalised over the batch; per rank, as TRL does per
                               completion; ``scale_rewards`` plays no part).
    list_reward                None (per-rank advantages, Rank-GRPO), "dcg" or "sum" (one advantage per list).
    importance_sampling_level  the unit of the ratio: "item", "token" or "sequence".
    length_shaping, overflow_penalty, end_of_list_bonus, early_stop_penalty
                               the code form's length shaping (``shaping_advantages``).
    """

    reward_kind: str = "exp_inf"
    reward_gamma: float | None = None
    scale_rewards: str = "group"
    multi_objective_aggregation: str = "sum_then_normalize"
    list_reward: str | None = None
    importance_sampling_level: str = "item"
    length_shaping: bool = True
    overflow_penalty: float = -0.1
    end_of_list_bonus: float = 0.1
    early_stop_penalty: float = -0.1

    def __post_init__(self):
        if self.reward_kind not in REWARD_KINDS:
            raise ValueError(f"reward_kind must be one of {REWARD_KINDS}, got {self.reward_kind!r}")
        rank_rewards(torch.zeros(1, 1), self.reward_kind, self.reward_gamma)  # gamma against the kind
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(f"scale_rewards must be one of {ADVANTAGE_SCALES}, got {self.scale_rewards!r}")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got "
                             f"{self.multi_objective_aggregation!r}")
        if self.list_reward is not None and self.list_reward not in LIST_REWARDS:
            raise ValueError(f"list_reward must be one of {LIST_REWARDS} or None, got {self.list_reward!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got "
                             f"{self.importance_sampling_level!r}")
        if not isinstance(self.length_shaping, bool):
            raise TypeError(f"length_shaping must be a bool, got {type(self.length_shaping).__name__}")
        for name in ("overflow_penalty", "end_of_list_bonus", "early_stop_penalty"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    @property
    def per_rank(self) -> bool:
        """Whether each rank has its own advantage (no list reward)."""
        return self.list_reward is None

    def check_loss_type(self, loss_type: str) -> None:
        """The paper form (``loss_type="rank"``) is defined for item ratios with per-rank advantages only."""
        if loss_type != "rank":
            return
        if self.importance_sampling_level != "item":
            raise ValueError(f"loss_type='rank' averages each item's term over its tokens, which needs "
                             f"importance_sampling_level='item', got {self.importance_sampling_level!r}; use a code "
                             f"form loss type (grpo, bnpo, dr_grpo, dapo) for the ratio ablations")
        if not self.per_rank:
            raise ValueError(f"loss_type='rank' sums per-rank terms, which needs per-rank advantages "
                             f"(list_reward=None), got list_reward={self.list_reward!r}; use a code form loss type")

    def rewards(self, values: torch.Tensor) -> torch.Tensor:
        """Per-rank rewards (B, N) from the reward's per-rank values (B, N)."""
        return rank_rewards(values, self.reward_kind, self.reward_gamma)

    def advantages(self, rewards: torch.Tensor, num_generations: int, weights: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Group advantages: (B, N) per rank, or (B, 1) per list with a list reward. Rows ``[g*G, (g+1)*G)`` are the
        G completions of prompt g. ``rewards`` are per-rank rewards (B, N), or (B, F, N) per reward function with
        ``weights`` (F,) (default 1 each), aggregated by ``multi_objective_aggregation``."""
        if rewards.dim() == 2:
            rewards = rewards.unsqueeze(1)
        if rewards.dim() != 3:
            raise ValueError(f"rewards must be (B, N) or (B, F, N), got shape {tuple(rewards.shape)}")
        weights = torch.ones(rewards.shape[1]) if weights is None else weights
        weights = weights.to(rewards.device, rewards.dtype if rewards.dtype.is_floating_point else torch.float32)
        if not self.per_rank:
            rewards = list_rewards(rewards.flatten(0, 1), self.list_reward).view(*rewards.shape[:2], 1)
        if self.multi_objective_aggregation == "sum_then_normalize":
            summed = (rewards * weights[None, :, None]).sum(1)
            return rank_advantages(summed, num_generations, scale=self.scale_rewards)
        summed = sum(weight * rank_advantages(rewards[:, f], num_generations, scale="group")
                     for f, weight in enumerate(weights))
        return (summed - summed.mean(0)) / (summed.std(0) + 1e-4)  # TRL's batch normalisation of the sum

    def loss_fields(self, advantages: torch.Tensor, segments: Segments, loss_type: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(item_ids, advantages)`` (B, T) for ``rank_grpo_loss*`` from this batch's advantages ((B, N) or (B, 1),
        as ``advantages`` returns them) and its segmentation."""
        self.check_loss_type(loss_type)
        paper_form = loss_type == "rank"
        item_ids = segments.item_ids_for(loss_type)
        in_loss = item_ids >= 0
        shaping = self.length_shaping and not paper_form
        if self.per_rank:
            per_token = token_advantages(advantages, segments, length_shaping=shaping,
                                         overflow_penalty=self.overflow_penalty,
                                         end_of_list_bonus=self.end_of_list_bonus,
                                         early_stop_penalty=self.early_stop_penalty)
        else:
            if not isinstance(advantages, torch.Tensor) or advantages.shape != (item_ids.shape[0], 1):
                raise ValueError(f"advantages must be a (B, 1) tensor per list with B={item_ids.shape[0]}, got "
                                 f"{getattr(advantages, 'shape', advantages)!r}")
            advantages = advantages.to(item_ids.device)
            if not advantages.dtype.is_floating_point:
                advantages = advantages.float()
            per_token = advantages.expand_as(item_ids) * in_loss
            if shaping:
                per_token = per_token + shaping_advantages(segments, self.overflow_penalty, self.end_of_list_bonus,
                                                           self.early_stop_penalty, per_token.dtype)
        if self.importance_sampling_level == "token":
            positions = torch.arange(item_ids.shape[1], device=item_ids.device).expand_as(item_ids)
            item_ids = torch.where(in_loss, positions, -1)
        elif self.importance_sampling_level == "sequence":
            item_ids = torch.where(in_loss, 0, -1)
        return item_ids, per_token
