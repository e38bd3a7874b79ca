"""rankgrpo-kernels: the Rank-GRPO loss for LLM recommenders without the (tokens x vocab) logits tensor.

The loss (``rank_grpo_loss``, ``rank_grpo_loss_from_logps``, ``fused_logprobs``, ``RankGRPOLoss``; their settings as
``LossSpec`` and ``HeadSpec``), the segmentation
of completions into ranked items (``segment_items``, ``split_items``), the per-rank rewards and advantages, and
``ObjectiveSpec`` (Rank-GRPO or the paper's baselines and ablations: per-rank or per-list advantages, the unit of the
ratio).
Framework adapters live in ``rankgrpo_kernels.adapters``, recommender rewards in ``rankgrpo_kernels.recommender``.
"""

from .functional import fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps
from .head.scratch import empty_cache
from .modules import RankGRPOLoss
from .objective import ObjectiveSpec
from .rewards import rank_advantages, rank_rewards, token_advantages
from .segments import Segments, line_table, newline_counts, segment_items, split_items
from .specs import HeadSpec, LossSpec

__version__ = "0.2.0"

# The 0.2 name of LossSpec, kept importable.
LossConfig = LossSpec

__all__ = [
    "HeadSpec",
    "LossConfig",
    "LossSpec",
    "ObjectiveSpec",
    "RankGRPOLoss",
    "Segments",
    "empty_cache",
    "fused_logprobs",
    "line_table",
    "newline_counts",
    "rank_advantages",
    "rank_grpo_loss",
    "rank_grpo_loss_from_logps",
    "rank_rewards",
    "segment_items",
    "split_items",
    "token_advantages",
]
