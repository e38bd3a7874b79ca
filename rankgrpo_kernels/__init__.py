"""rankgrpo-kernels: the Rank-GRPO loss for LLM recommenders without the (tokens x vocab) logits tensor."""

from .catalog import Catalog, make_rank_hit_reward, normalize_title, parse_item, rank_hits
from .functional import fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps
from .modules import RankGRPOLoss
from .rewards import rank_advantages, rank_rewards, token_advantages
from .contract import LossConfig
from .segments import Segments, line_table, newline_counts, segment_items, split_items

__version__ = "0.1.0"

__all__ = [
    "Catalog",
    "LossConfig",
    "RankGRPOLoss",
    "Segments",
    "fused_logprobs",
    "line_table",
    "make_rank_hit_reward",
    "newline_counts",
    "normalize_title",
    "parse_item",
    "rank_advantages",
    "rank_grpo_loss",
    "rank_grpo_loss_from_logps",
    "rank_hits",
    "rank_rewards",
    "segment_items",
    "split_items",
    "token_advantages",
]
