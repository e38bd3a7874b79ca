"""``RankGRPOPolicyLoss``: OpenRLHF's ``PolicyLoss`` with Rank-GRPO's item-level ratio."""

from __future__ import annotations

import contextlib

import torch
from openrlhf.models.loss import PolicyLoss
from openrlhf.models.utils import masked_mean

from ..common import Aggregation, Clip, framework_loss
from .corrections import rollout_is_weights
from .forward_loss import current_forward_loss


class RankGRPOPolicyLoss(PolicyLoss):
    """``PolicyLoss`` with the rank-level (item-level) ratio ``w_k = exp(mean_{t in k} (l_t - o_t))``.

    Constructor as ``PolicyLoss`` plus ``form`` ("code" or "rank") and, for the paper form, ``rec_num`` (N).
    ``dual_clip`` becomes Rank-GRPO's ``delta``: for ``A < 0`` both cap the ratio at ``dual_clip``, the same
    function when ``dual_clip >= 1 + clip_eps_high``.
    ``policy_loss_type`` only keeps its effect on the aggregation ("gspo" forces the per-sample mean); the ratio
    is always per item.

    Rollout importance-sampling correction (``is_correction_level`` "token" or "seq", and "item": the item's
    geometric mean of ``pi_train / pi_rollout``), with OpenRLHF's ``is_correction_mode``, ``_gating`` and
    ``_threshold``, weights each token's policy term as OpenRLHF's ``PolicyLoss`` does (``rollout_is_weights``);
    ``forward`` then also returns OpenRLHF's vLLM KL and filtered fraction.

    Aggregation (as OpenRLHF's ``aggregate_loss``): per token, ``sum_t M L_t / batch_num_tokens * dp_size``
    (``loss_type="dapo"``; a plain token mean without ``batch_num_tokens``); per sample, ``sum_i mean_t L_t /
    global_batch_size * dp_size`` (``"grpo"`` rescaled). The paper form divides by ``B N`` with ``B`` the global
    number of samples. Item ids one per sequence give GSPO, one per token give PPO.
    """

    def __init__(self, *args, form: str = "code", rec_num: int | None = None, **kwargs):
        item_level = kwargs.get("is_correction_level") == "item"
        if item_level:  # OpenRLHF's checks know token and seq; item is seq's gate over each item's tokens
            kwargs["is_correction_level"] = "seq"
        super().__init__(*args, **kwargs)
        if item_level:
            self.is_correction_level = "item"
        if self.dual_clip is not None and self.dual_clip < 1 + self.clip_eps_high:
            raise ValueError(f"dual_clip={self.dual_clip} must be >= 1 + clip_eps_high with Rank-GRPO")
        self.form, self.rec_num = form, rec_num
        self.aggregation(1, 1, None)  # checks form and rec_num
        self.clip = Clip(self.clip_eps_low, self.clip_eps_high, self.dual_clip)
        self.bound_item_ids = None

    def aggregation(self, samples, dp_size: int, batch_num_tokens) -> Aggregation:
        """OpenRLHF's aggregation of one micro-batch (``aggregate_loss``): per token over ``batch_num_tokens``, or
        per sample over ``samples`` (``policy_loss_type="gspo"`` or ``token_level_loss=False``)."""
        return Aggregation(self.form, per_sample=not self.token_level_loss, samples=samples, dp_size=dp_size,
                           token_count=None if batch_num_tokens is None else batch_num_tokens / dp_size,
                           rec_num=self.rec_num)

    @contextlib.contextmanager
    def bind_item_ids(self, item_ids: torch.Tensor):
        """Within the block, ``forward`` without ``item_ids`` uses these (B, A) item ids."""
        self.bound_item_ids = item_ids
        try:
            yield self
        finally:
            self.bound_item_ids = None

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
        *,
        item_ids: torch.Tensor | None = None,
    ):
        """All tensors (B, A); ``advantages`` per token. Returns ``(loss, clip_ratio, ppo_kl, vllm_kl, filtered)``
        like ``PolicyLoss`` (the last two None without rollout correction). Inside a training step whose actor
        forward computed the loss (``forward_loss``), returns that loss and ignores ``log_probs``."""
        bound = current_forward_loss()
        if bound is not None and bound.policy_loss is self and bound.result is not None:
            return bound.policy_loss_outputs()
        item_ids = self.bound_item_ids if item_ids is None else item_ids
        if item_ids is None:
            raise ValueError("RankGRPOPolicyLoss needs item_ids: pass them or call it inside bind_item_ids(...)")
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        samples = (mask.sum(-1) > 0).sum().clamp(min=1) if global_batch_size is None else global_batch_size
        weights, vllm_kl, filtered = self.rollout_correction(old_log_probs, rollout_log_probs, mask, item_ids)
        loss, stats = framework_loss(log_probs, old_log_probs, advantages, mask, item_ids,
                                     self.aggregation(samples, dp_size, batch_num_tokens), self.clip,
                                     policy_weights=weights)
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), mask, dim=None)
        return loss, stats["clip_ratio_region"].float(), ppo_kl, vllm_kl, filtered

    def rollout_correction(self, old_log_probs, rollout_log_probs, mask, item_ids):
        """The rollout importance-sampling correction of a micro-batch (all (B, A)): the policy weights, OpenRLHF's
        vLLM KL and the fraction filtered (``rollout_is_weights``); three None when ``is_correction_level`` is off."""
        if self.is_correction_level == "off":
            return None, None, None
        if rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        weights, filtered = rollout_is_weights(
            old_log_probs, rollout_log_probs, mask, item_ids, level=self.is_correction_level,
            mode=self.is_correction_mode, gating=self.is_correction_gating, threshold=self.is_correction_threshold)
        return weights, masked_mean((rollout_log_probs - old_log_probs).detach(), mask, dim=None), filtered
