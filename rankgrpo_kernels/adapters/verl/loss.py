"""The ``"rank_grpo"`` policy loss and the actor's loss hook ``rank_grpo_ppo_loss``, which segments each micro-batch
and hands the policy loss its item ids."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
from verl.utils import torch_functional as verl_F
from verl.workers.utils import losses

from ...rewards import token_advantages
from ...segments import segment_items
from ..common import framework_loss
from .config import NAME, _get, _segmentation, _setting

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
    info = config.global_batch_info
    dp = info.get("dp_size", 1) or 1
    mask = response_mask.bool()
    samples = info.get("global_batch_size")
    samples = (mask.sum(-1) > 0).sum().clamp(min=1) if samples is None else samples
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    policy_loss, where = _get(config, "policy_loss"), "actor_rollout_ref.actor.policy_loss"
    form = _setting("form", policy_loss, where)
    per_sample = loss_agg_mode == "seq-mean-token-mean"
    token_count = None
    if form == "code" and not per_sample and not (loss_agg_mode == "token-mean" and
                                                  info.get("batch_num_tokens") is None):
        denominators = {
            "token-mean": lambda: info["batch_num_tokens"] / dp,
            "token-sum": lambda: 1.0 / dp,
            "seq-mean-token-sum": lambda: samples / dp,
            "seq-mean-token-sum-norm": lambda: samples / dp * (info.get("loss_scale_factor") or mask.shape[-1]),
        }
        if loss_agg_mode not in denominators:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
        token_count = denominators[loss_agg_mode]()
    loss, stats = framework_loss(
        log_prob, old_log_prob, advantages, mask, item_ids, form=form,
        rec_num=_setting("rec_num", policy_loss, where) if form == "rank" else None, per_sample=per_sample,
        token_count=token_count, samples=samples, dp_size=dp, epsilon_low=low, epsilon_high=high,
        delta=config.get("clip_ratio_c", 3.0), policy_weights=rollout_is_weights,
    )
    ppo_kl = verl_F.masked_mean(-(log_prob - old_log_prob).detach(), mask)
    metrics = {
        "actor/pg_clipfrac": stats["clip_ratio_region"].item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/rank_clipfrac_low": stats["clip_ratio_low"].item(),
        "actor/rank_clipfrac_high": stats["clip_ratio_high"].item(),
        "actor/rank_ratio_mean": stats["ratio_mean"].item(),
    }
    return loss, metrics


def _padded(x: torch.Tensor) -> torch.Tensor:
    return x.to_padded_tensor(0) if x.is_nested else x


def rank_grpo_ppo_loss(config, model_output, data, dp_group=None):
    """verl's loss hook (signature of ``verl.workers.utils.losses.ppo_loss``) for Rank-GRPO.

    Segments ``data["responses"]`` (B, T) under ``response_mask`` into N items, turns the packed per-rank
    advantages ``data["advantages"][:, :N]`` into per-token ones (the code form's, length shaping included, or
    ``A[i, k]`` on item tokens for the paper form) and runs ``ppo_loss`` with the item ids bound, so that its
    policy loss ``"rank_grpo"`` (``actor.policy_loss.loss_mode``) sees them. Returns ``ppo_loss``'s
    ``(loss, metrics)``; other loss modes go to ``ppo_loss`` unchanged. Settings: ``install()`` or the actor's
    config (``RankGRPOPolicyLossConfig`` and ``config.model_config.tokenizer``), package docstring.
    """
    if config.policy_loss.get("loss_mode", "vanilla") != NAME:
        return losses.ppo_loss(config, model_output, data, dp_group)
    settings = _segmentation(config)
    responses, mask = _padded(data["responses"]), _padded(data["response_mask"])
    segments = segment_items(responses, mask, settings["table"].to(responses.device), settings["rec_num"],
                             eos_token_id=settings["eos_token_id"], skip_blank_lines=settings["skip_blank_lines"])
    paper = settings["form"] == "rank"
    rank_adv = _padded(data["advantages"])[:, : settings["rec_num"]]
    data = data.copy()
    data["advantages"] = token_advantages(rank_adv, segments, length_shaping=not paper)
    with bind_item_ids(segments.item_ids_for("rank" if paper else "bnpo")):
        return losses.ppo_loss(config, model_output, data, dp_group)
