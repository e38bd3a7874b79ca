"""Rank-GRPO in OpenRLHF 0.11 (``openrlhf==0.11.*``), without forking it.

Three pieces, each a drop-in for an OpenRLHF object:

* ``RankGRPOPolicyLoss``: ``openrlhf.models.loss.PolicyLoss`` with the same constructor and ``forward`` signature and
  the same five return values, computing the item-level ratio of Rank-GRPO. It takes the item of each action token
  as the keyword ``item_ids`` or, inside OpenRLHF's training step, from ``bind_item_ids``.
* ``RankGRPOExperienceMaker``: ``RemoteExperienceMaker`` whose ``compute_advantages_and_returns`` turns per-rank
  rewards (B, N), one list of N numbers per sample from the reward function, into per-rank group advantages
  (``rank_advantages``) and then into per-token advantages on the items of each response.
* ``fused_actor_forward``: ``openrlhf.models.Actor.forward`` computing the action log-probs with ``fused_logprobs``
  from the last hidden states and the LM head, never holding (B, S, V) float32 logits (``patch_actor_forward``);
  inside the installed training step it computes the whole actor loss instead (``forward_loss``: three GEMMs over
  the tokens the loss needs, OpenRLHF's KL and entropy terms included where its options allow).
* ``install(tokenizer, rec_num)`` puts the first two into OpenRLHF
  (``openrlhf.trainer.ppo_trainer.RemoteExperienceMaker``, ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` and
  ``ActorPPOTrainer.training_step``); run it in every process, the Ray workers included (see
  ``integrations/openrlhf/README.md``).

Layout (OpenRLHF's): ``sequences`` (B, S) prompt and response, ``action_mask`` (B, A) with A = S - 1 over the shifted
sequence, so action token a is ``sequences[:, 1 + a]``; log-probs, advantages and item ids are (B, A).

Modules: ``items`` (``RankItems``, the segmentation into items), ``loss`` (the policy loss), ``corrections`` (the
rollout importance-sampling weights), ``advantages`` (the experience maker), ``actor`` (the fused forward),
``forward_loss`` (the loss in the forward), ``installer`` (``install``).
"""

from .actor import fused_actor_forward, patch_actor_forward
from .advantages import RankGRPOExperienceMaker, group_rank_advantages
from .corrections import rollout_is_weights
from .installer import install
from .items import RankItems
from .loss import RankGRPOPolicyLoss

__all__ = ["RankGRPOExperienceMaker", "RankGRPOPolicyLoss", "RankItems", "fused_actor_forward",
           "group_rank_advantages", "install", "patch_actor_forward", "rollout_is_weights"]
