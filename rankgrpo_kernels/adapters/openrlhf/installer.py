"""``install``: routes OpenRLHF's PPO trainer through Rank-GRPO (experience maker, policy loss, training step)."""

from __future__ import annotations

import functools

from .advantages import RankGRPOExperienceMaker
from .forward_loss import ForwardLoss, bind_forward_loss
from .items import RankItems
from .loss import RankGRPOPolicyLoss


def install(tokenizer, rec_num: int, *, form: str = "code", skip_blank_lines: bool = True) -> RankItems:
    """Route OpenRLHF's PPO through Rank-GRPO in this process (the driver and every actor worker).

    Patches ``openrlhf.trainer.ppo_trainer.RemoteExperienceMaker`` (per-rank advantages),
    ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` (the item-level loss) and
    ``ActorPPOTrainer.training_step``: segments each micro-batch, binds its item ids to the loss and the micro-batch
    to the fused actor forward (``patch_actor_forward``), which then computes the whole actor loss, KL and entropy
    terms included, where OpenRLHF's options allow (``forward_loss``), and reports its metrics.
    """
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor
    from openrlhf.utils.loss_utils import get_loss_batch_info

    items = RankItems.from_tokenizer(tokenizer, rec_num, skip_blank_lines=skip_blank_lines, form=form)
    ppo_trainer.RemoteExperienceMaker = type("RankGRPOExperienceMaker", (RankGRPOExperienceMaker,), {"items": items})
    ppo_actor.PolicyLoss = functools.partial(RankGRPOPolicyLoss, form=form, rec_num=rec_num)
    trainer = ppo_actor.ActorPPOTrainer
    original = getattr(trainer.training_step, "__wrapped__", trainer.training_step)

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        item_ids = items.item_ids(experience.sequences, experience.action_mask)
        if loss_batch_info is None:  # as OpenRLHF's step computes it, needed before the forward here
            loss_batch_info = get_loss_batch_info(self.strategy, experience.action_mask,
                                                  replay_buffer=self.replay_buffer, step=step,
                                                  dynamic_batch=self.args.train.dynamic_batch_enable)
        forward_loss = ForwardLoss(self.actor_loss_fn, self.args, kl_ctl, experience, item_ids, loss_batch_info)
        with self.actor_loss_fn.bind_item_ids(item_ids), bind_forward_loss(forward_loss):
            return forward_loss.report(original(self, experience, kl_ctl, step, loss_batch_info))

    training_step.__wrapped__ = original
    trainer.training_step = training_step
    return items
