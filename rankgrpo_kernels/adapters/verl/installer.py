"""``install``: registers the ``"rank_grpo"`` advantage estimator and policy loss with verl and sets its loss hook."""

from __future__ import annotations

from verl.trainer.ppo import core_algos

from .advantages import compute_rank_grpo_advantage
from .config import NAME, store_settings
from .hook import rank_grpo_ppo_loss
from .loss import compute_policy_loss_rank_grpo


def install(tokenizer=None, rec_num: int | None = None, *, form: str | None = None,
            skip_blank_lines: bool | None = None) -> None:
    """Register the ``"rank_grpo"`` advantage estimator and policy loss, set the segmentation they use, and make
    ``rank_grpo_ppo_loss`` the actor's loss hook (``verl.workers.engine_workers.ppo_loss``, which the actor worker
    binds with ``set_loss_fn`` when it builds the model).

    Settings left out (None) come from verl's config (the package docstring); ``form`` defaults to ``"code"`` and
    ``skip_blank_lines`` to True. Each call replaces the settings of the previous one.
    """
    from verl.workers import engine_workers

    store_settings(tokenizer, rec_num=rec_num, form=form, skip_blank_lines=skip_blank_lines)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_rank_grpo_advantage:
        core_algos.register_adv_est(NAME)(compute_rank_grpo_advantage)
    core_algos.register_policy_loss(NAME)(compute_policy_loss_rank_grpo)
    engine_workers.ppo_loss = rank_grpo_ppo_loss
