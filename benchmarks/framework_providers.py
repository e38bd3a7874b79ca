"""Providers named after the log-prob frameworks: each times its adapter's loss path on the benchmark's batch.

``verl``: the loss the verl adapter computes inside the model's forward (``adapters/verl/forward_loss.py``):
``framework_fused_loss`` with the aggregation and clip range the adapter reads from verl's ``ActorConfig``
(``loss_agg_mode=token-mean``, ``clip_ratio_low/high`` = the setting's eps, a ``low_var_kl`` KL loss at the setting's
beta): three GEMMs over the tokens the loss needs. ``openrlhf``: the loss the OpenRLHF adapter computes inside the
actor's forward (``adapters/openrlhf/forward_loss.py``): ``ForwardLoss.run`` with OpenRLHF's token-level
aggregation over the batch's tokens, ``eps_clip_low_high`` = the setting's eps and a ``k3`` KL loss at the setting's
beta: three GEMMs over the tokens the loss needs. Items come from the batch (the segmentation and the frameworks'
batch plumbing are not timed).

Each needs its framework, which lives in its own venv (``scripts/framework_venv.sh verl`` builds ``.venv-verl``):
``providers.py`` registers them with that venv's interpreter, so their worker processes run there while the rest of
the run stays in this one. This module imports nothing of the benchmark's: the workers import it.
"""

from __future__ import annotations


def verl_loss(batch):
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    from rankgrpo_kernels.adapters.common import framework_fused_loss
    from rankgrpo_kernels.adapters.verl.loss import aggregation, clip

    s, inputs = batch.settings, batch.loss_inputs
    if s["loss_type"] != "bnpo":
        raise ValueError(f"the verl provider times verl's token-mean (bnpo), got loss_type {s['loss_type']!r}")
    # clip_ratio_c 1e9: no dual clip, as the benchmark's loss settings
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size=1, clip_ratio_low=s["epsilon_low"],
                         clip_ratio_high=s["epsilon_high"], loss_agg_mode="token-mean", clip_ratio_c=1e9,
                         use_kl_loss=s["beta"] != 0.0, kl_loss_type="low_var_kl", kl_loss_coef=s["beta"],
                         policy_loss=PolicyLossConfig(loss_mode="rank_grpo"))
    mask = inputs["completion_mask"].bool()
    agg, clip_range = aggregation(config, config.loss_agg_mode, mask), clip(config)
    kl = dict(ref_log_probs=inputs["ref_logps"], beta=s["beta"]) if config.use_kl_loss else {}

    def loss():
        return framework_fused_loss(batch.hidden, batch.weight, batch.target_ids, agg, clip_range,
                                    item_ids=inputs["item_ids"], advantages=inputs["advantages"], mask=mask,
                                    old_log_probs=inputs["old_logps"], head={}, **kl)[0]
    return loss


def openrlhf_loss(batch):
    from types import SimpleNamespace

    from rankgrpo_kernels.adapters.openrlhf import RankGRPOPolicyLoss
    from rankgrpo_kernels.adapters.openrlhf.forward_loss import ForwardLoss

    s, inputs = batch.settings, batch.loss_inputs
    if s["loss_type"] != "bnpo":
        raise ValueError(f"the openrlhf provider times OpenRLHF's token mean (bnpo), got {s['loss_type']!r}")
    mask = inputs["completion_mask"].bool()
    # OpenRLHF's step always has old log-probs (on-policy: the policy's) and normalises by the batch's tokens
    old = batch.logps if inputs["old_logps"] is None else inputs["old_logps"]
    experience = SimpleNamespace(action_mask=mask, advantages=inputs["advantages"], action_log_probs=old,
                                 base_action_log_probs=inputs["ref_logps"], rollout_log_probs=None)
    kl = SimpleNamespace(use_loss=True, init_coef=s["beta"], estimator="k3", unbiased_gradient=False)
    args = SimpleNamespace(algo=SimpleNamespace(kl=kl), actor=SimpleNamespace(entropy_coef=None))
    policy_loss = RankGRPOPolicyLoss(clip_eps_low=s["epsilon_low"], clip_eps_high=s["epsilon_high"])
    info = {"dp_size": 1, "batch_num_tokens": mask.sum().float(), "global_batch_size": float(mask.shape[0])}

    def loss():
        forward_loss = ForwardLoss(policy_loss, args, s["beta"], experience, inputs["item_ids"], info)
        if forward_loss.run(batch.hidden, batch.weight, None, batch.target_ids, {}) is None:
            raise ValueError("the openrlhf provider's settings left the fused path")
        return forward_loss.result[0]
    return loss

