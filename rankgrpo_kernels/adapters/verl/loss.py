"""The ``"rank_grpo"`` policy loss (the recompute path: verl's log-probs in, the loss out), with the pieces of
verl's configuration both paths read: the aggregation, the clip range and the policy metrics."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
from verl.utils import torch_functional as verl_F

from ..common import Aggregation, Clip, framework_loss
from .config import _get, _setting

_ITEM_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("rank_grpo_item_ids", default=None)


@contextlib.contextmanager
def bind_item_ids(item_ids: torch.Tensor):
    """Within the block the ``"rank_grpo"`` policy loss groups tokens by these (B, T) item ids."""
    token = _ITEM_IDS.set(item_ids)
    try:
        yield
    finally:
        _ITEM_IDS.reset(token)


def compute_policy_loss_rank_grpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                  config=None, rollout_is_weights=None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"rank_grpo"``: ``-min(w' a_t, clip(w_k, 1 - eps_low, 1 + eps_high) a_t)`` per token,
    ``w' = min(w_k, clip_ratio_c)`` (verl's dual clip), aggregated as ``agg_loss(loss_agg_mode)`` does:

    ``token-mean``  sum M L / batch_num_tokens * dp      (``dapo``; a token mean without batch_num_tokens)
    ``token-sum``   sum M L * dp                         (``dapo`` with 1 / dp)
    ``seq-mean-token-mean``  sum_i mean_t L / global_batch_size * dp  (``grpo`` rescaled)
    ``seq-mean-token-sum[-norm]``  sum M L / global_batch_size * dp [/ loss_scale_factor]  (``dapo``)

    ``rollout_is_weights`` (verl's rollout correction, (B, T), computed by verl) multiply each token's policy term,
    as in verl's vanilla loss. Item ids come from ``bind_item_ids``; one item per sequence is verl's GSPO, one per
    token its vanilla PPO.
    """
    item_ids = _ITEM_IDS.get()
    if item_ids is None:
        raise ValueError("the rank_grpo policy loss needs item ids: use rank_grpo_ppo_loss as the actor's loss_fn")
    mask = response_mask.bool()
    loss, stats = framework_loss(log_prob, old_log_prob, advantages, mask, item_ids,
                                 aggregation(config, loss_agg_mode, mask), clip(config),
                                 policy_weights=rollout_is_weights)
    metrics = policy_metrics(stats)
    metrics["actor/ppo_kl"] = verl_F.masked_mean(-(log_prob - old_log_prob).detach(), mask).item()
    return loss, metrics


def aggregation(config, loss_agg_mode: str, mask: torch.Tensor) -> Aggregation:
    """verl's ``agg_loss(loss_agg_mode)`` of a micro-batch (``mask`` (B, T): its loss tokens) with the global
    normalisers of ``config.global_batch_info`` (``ppo_loss`` sets them), as our aggregation (the table of
    ``compute_policy_loss_rank_grpo``); the form and N from the settings."""
    info = config.global_batch_info
    dp = info.get("dp_size", 1) or 1
    samples = info.get("global_batch_size")
    samples = (mask.sum(-1) > 0).sum().clamp(min=1) if samples is None else samples
    policy_loss, where = _get(config, "policy_loss"), "actor_rollout_ref.actor.policy_loss"
    form = _setting("form", policy_loss, where)
    per_sample = loss_agg_mode == "seq-mean-token-mean"
    denominators = {
        "token-mean": lambda: None if info.get("batch_num_tokens") is None else info["batch_num_tokens"] / dp,
        "token-sum": lambda: 1.0 / dp,
        "seq-mean-token-sum": lambda: samples / dp,
        "seq-mean-token-sum-norm": lambda: samples / dp * (info.get("loss_scale_factor") or mask.shape[-1]),
        "seq-mean-token-mean": lambda: None,
    }
    if loss_agg_mode not in denominators:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return Aggregation(form, per_sample=per_sample, token_count=denominators[loss_agg_mode](), samples=samples,
                       dp_size=dp, rec_num=_setting("rec_num", policy_loss, where) if form == "rank" else None)


def clip(config) -> Clip:
    """verl's clip range (``clip_ratio_low``/``_high``, else ``clip_ratio``) and dual clip ``clip_ratio_c``."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return Clip(low, high, config.get("clip_ratio_c", 3.0))


def policy_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """verl's policy-loss metrics from the loss's statistics (token means over the loss tokens)."""
    return {
        "actor/pg_clipfrac": stats["clip_ratio_region"].item(),
        "actor/rank_clipfrac_low": stats["clip_ratio_low"].item(),
        "actor/rank_clipfrac_high": stats["clip_ratio_high"].item(),
        "actor/rank_ratio_mean": stats["ratio_mean"].item(),
    }
