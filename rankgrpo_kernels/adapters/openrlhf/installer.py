"""``install``: routes OpenRLHF's PPO trainer through Rank-GRPO (experience maker, policy loss, training step)."""

from __future__ import annotations

import functools

from .advantages import RankGRPOExperienceMaker
from .items import RankItems
from .loss import RankGRPOPolicyLoss


def install(tokenizer, rec_num: int, *, form: str = "code", skip_blank_lines: bool = True) -> RankItems:
    """Route OpenRLHF's PPO through Rank-GRPO in this process (the driver and every actor worker).

    Patches ``openrlhf.trainer.ppo_trainer.RemoteExperienceMaker`` (per-rank advantages),
    ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` (the item-level loss) and
    ``ActorPPOTrainer.training_step`` (segments each micro-batch and binds its item ids to the loss).
    """
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor

    items = RankItems.from_tokenizer(tokenizer, rec_num, skip_blank_lines=skip_blank_lines, form=form)
    ppo_trainer.RemoteExperienceMaker = type("RankGRPOExperienceMaker", (RankGRPOExperienceMaker,), {"items": items})
    ppo_actor.PolicyLoss = functools.partial(RankGRPOPolicyLoss, form=form, rec_num=rec_num)
    trainer = ppo_actor.ActorPPOTrainer
    original = getattr(trainer.training_step, "__wrapped__", trainer.training_step)

    def training_step(self, experience, *args, **kwargs):
        with self.actor_loss_fn.bind_item_ids(items.item_ids(experience.sequences, experience.action_mask)):
            return original(self, experience, *args, **kwargs)

    training_step.__wrapped__ = original
    trainer.training_step = training_step
    return items
