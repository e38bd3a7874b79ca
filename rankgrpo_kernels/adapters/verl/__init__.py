"""Rank-GRPO in verl 0.9 (``verl==0.9.*``), through its registries and its loss hook.

verl's registries see no token ids, so the work is split three ways:

* advantage estimator ``"rank_grpo"`` (``core_algos.register_adv_est``): per-rank rewards (B, N), written by the
  reward manager into the first N columns of ``token_level_rewards`` (``pack_rank_values``), become per-rank group
  advantages ``A[i, k] = (r[i, k] - mean_g r[g, k]) / (std_g r[g, k] + 1e-4)`` over the samples of one ``uid``,
  returned in the same packed layout;
* the loss hook ``rank_grpo_ppo_loss(config, model_output, data)`` (verl's ``ppo_loss`` signature, set with
  ``actor.set_loss_fn``): it sees the whole micro-batch, segments ``data["responses"]`` into items, spreads the
  packed per-rank advantages over the item tokens and runs verl's own ``ppo_loss`` (entropy, KL loss, metrics)
  with the item ids bound for
* policy loss ``"rank_grpo"`` (``core_algos.register_policy_loss``, ``actor.policy_loss.loss_mode=rank_grpo``):
  the item-level ratio ``w_k = exp(mean_{t in k} (l_t - o_t))`` with verl's clip range, dual clip and
  ``loss_agg_mode``.

``install(tokenizer, rec_num)`` registers all three; ``patch_fused_logprobs()`` swaps verl's
``FusedLinearForPPO`` (the ``use_fused_kernels=True`` path) for ``fused_logprobs``. Run both in every process, the
Ray workers included (see ``integrations/verl/README.md``). All tensors here are (B, T) over the response tokens.

The loss hook and the policy loss need settings (N = ``rec_num``, the tokenizer's newline table and EOS id,
``form``, ``skip_blank_lines``); the estimator needs none. They come from ``install(tokenizer, rec_num)`` or from the
actor's config that verl hands to both: ``actor_rollout_ref.actor.policy_loss`` as a ``RankGRPOPolicyLossConfig``
(``rec_num``, ``form``, ``skip_blank_lines``) and the tokenizer verl loads for the actor
(``config.model_config.tokenizer``). A value given both ways must agree; one given neither way is an error that
names both.

With ``use_fused_kernels=True`` and ``patch_fused_logprobs()``, the actor update computes the loss inside the model's
forward, from the last hidden states and the head (``forward_loss``: three GEMMs over the tokens the loss needs),
and falls back to log-probs of the response tokens only where verl's options rule that out. Items are segmented
from the whole response (its attention mask): a rollout rejection (``rollout_rs``) in ``response_mask`` only masks
the loss.

Modules: ``config`` (the settings and ``RankGRPOPolicyLossConfig``), ``advantages`` (the estimator), ``items`` (the
segmentation of a micro-batch), ``loss`` (the policy loss, verl's aggregation and clip range), ``forward_loss`` (the
loss in the model's forward), ``hook`` (the loss hook and the forward step that binds its micro-batch), ``fused``
(``patch_fused_logprobs``), ``installer`` (``install``).
"""

from .advantages import compute_rank_grpo_advantage, pack_rank_values
from .config import _SETTINGS as _SETTINGS  # the tests read it; install() rewrites it in place
from .config import NAME, SETUP_HINT, RankGRPOPolicyLossConfig
from .fused import _FUSED_FORWARD_MODULES as _FUSED_FORWARD_MODULES  # the tests read it
from .fused import FusedLogprobsForPPO, patch_fused_logprobs
from .installer import install
from .hook import rank_grpo_ppo_loss
from .loss import bind_item_ids, compute_policy_loss_rank_grpo

__all__ = ["NAME", "SETUP_HINT", "FusedLogprobsForPPO", "RankGRPOPolicyLossConfig", "bind_item_ids",
           "compute_policy_loss_rank_grpo", "compute_rank_grpo_advantage", "install", "pack_rank_values",
           "patch_fused_logprobs", "rank_grpo_ppo_loss"]
