"""The actor's loss hook ``rank_grpo_ppo_loss`` and ``patch_forward_step``, which binds each training micro-batch
around verl's forward step so that the model's fused forward computes the loss (``forward_loss``)."""

from __future__ import annotations

import functools

from verl.utils.metric import AggregationType, Metric
from verl.workers.utils import losses

from .config import NAME, _segmentation
from .forward_loss import ForwardLoss, bind_forward_loss, current_forward_loss, set_batch_info
from .items import MicroBatchItems
from .loss import bind_item_ids, policy_metrics


def rank_grpo_ppo_loss(config, model_output, data, dp_group=None):
    """verl's loss hook (signature of ``verl.workers.utils.losses.ppo_loss``) for Rank-GRPO.

    When the model's forward computed the loss (the fused path, ``forward_loss``), returns it with its metrics.
    Otherwise segments ``data["responses"]`` (B, T) into N items (``MicroBatchItems``: from the whole response,
    ``response_mask`` masking the loss only), turns the packed per-rank advantages ``data["advantages"][:, :N]``
    into per-token ones (the code form's, length shaping included, or ``A[i, k]`` on item tokens for the paper
    form) and runs ``ppo_loss`` with the item ids bound, so that its policy loss ``"rank_grpo"``
    (``actor.policy_loss.loss_mode``) sees them. Returns ``(loss, metrics)``; other loss modes go to ``ppo_loss``
    unchanged. Settings: ``install()`` or the actor's config (``RankGRPOPolicyLossConfig`` and
    ``config.model_config.tokenizer``), package docstring.
    """
    if config.policy_loss.get("loss_mode", "vanilla") != NAME:
        return losses.ppo_loss(config, model_output, data, dp_group)
    bound = current_forward_loss()
    if bound is not None and bound.result is not None:
        return _fused_loss_and_metrics(bound, data)
    items = MicroBatchItems.from_data(data, _segmentation(config))
    data = data.copy()
    data["advantages"] = items.advantages
    with bind_item_ids(items.item_ids):
        return losses.ppo_loss(config, model_output, data, dp_group)


def _fused_loss_and_metrics(bound: ForwardLoss, data):
    """The loss the forward computed and verl's metrics of it: the policy metrics, ``actor/pg_loss`` (the whole
    objective, KL and entropy bonus included), ``kl_loss`` and ``actor/entropy_loss`` as token means. verl's
    ``actor/ppo_kl`` needs every token's log-prob, which the fused path never forms."""
    config, (loss, stats) = bound.config, bound.result
    summed = set_batch_info(config, data)
    metrics = Metric.from_dict(policy_metrics(stats), aggregation=AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=loss, aggregation=AggregationType.SUM if summed else AggregationType.MEAN)
    if "entropy" in stats:
        metrics["actor/entropy_loss"] = Metric(value=stats["entropy"], aggregation=AggregationType.MEAN)
    if "kl" in stats:
        metrics["kl_loss"] = Metric(value=stats["kl"], aggregation=AggregationType.MEAN)
        metrics["kl_coef"] = config.kl_loss_coef
    return loss, metrics


def _with_forward_loss(forward_step):
    """verl's engine ``forward_step`` binding each training micro-batch of the Rank-GRPO loss hook
    (``bind_forward_loss``); other calls (log-prob passes, other losses, Ulysses sequence parallelism, whose
    forward sees a slice of each sequence) run it as it is."""
    if getattr(forward_step, "rank_grpo_forward_loss", False):
        return forward_step

    @functools.wraps(forward_step)
    def forward_step_with_loss(self, micro_batch, loss_function, forward_only):
        config = getattr(loss_function, "keywords", {}).get("config")
        ours = getattr(loss_function, "func", None) is rank_grpo_ppo_loss and config is not None and \
            config.policy_loss.get("loss_mode", "vanilla") == NAME
        if forward_only or not ours or getattr(self, "use_ulysses_sp", False):
            return forward_step(self, micro_batch, loss_function, forward_only)
        with bind_forward_loss(config, micro_batch):
            return forward_step(self, micro_batch, loss_function, forward_only)

    forward_step_with_loss.rank_grpo_forward_loss = True
    return forward_step_with_loss


def patch_forward_step() -> None:
    """Bind the training micro-batches of verl's FSDP engine (``FSDPEngineWithLMHead.forward_step``, the
    engine-based workers' actor) for the fused forward (``_with_forward_loss``)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    FSDPEngineWithLMHead.forward_step = _with_forward_loss(FSDPEngineWithLMHead.forward_step)
