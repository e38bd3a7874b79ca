"""``ForwardLoss``: a training micro-batch's Rank-GRPO actor loss computed inside OpenRLHF's actor forward, on the
last hidden states and the head (the fused path: three GEMMs over the tokens the loss needs, at beta 0 only over the
items with a non-zero advantage), OpenRLHF's KL loss and entropy terms included.

OpenRLHF's ``training_step`` runs the actor forward for the log-probs, then the policy loss, then adds its KL loss
(``kl_ctl`` times the token aggregate of ``compute_approx_kl``) and subtracts its entropy term. The installer's
training step binds the micro-batch (``bind_forward_loss``); the fused actor forward hands its states and head to
``ForwardLoss.run``, which computes the whole objective and returns placeholder log-probs, those the KL term reads
(the reference's, else the old ones), with zero entropies: OpenRLHF's KL and entropy terms come out 0 without
gradient, ``RankGRPOPolicyLoss`` returns the loss the forward computed, and ``report`` writes the step's metrics.

The fused path covers both forms, both aggregations, the clip range, the dual clip, the rollout importance-sampling
weights and, in the code form with the per-token aggregation, a KL loss with ``kl_estimator=k3`` and an entropy
term. Otherwise (``k1``/``k2``, ``unbiased_gradient``, a KL or entropy term with the per-sample aggregation, whose
policy terms are sequence means while OpenRLHF's KL and entropy stay token aggregates, or in the paper form, whose
loss tokens are the items' only) the forward computes every action token's log-prob and OpenRLHF's step runs as
before (the recompute path). Differences on the fused path: OpenRLHF clamps each token's k3 at 10 (a log-prob more
than about 2.6 below the reference's), the fused k3 does not; ``ppo_kl`` and ``logprobs_diff``, which need every
token's log-prob, are not reported. The choice reads the settings only, so every data-parallel rank takes the same
path and reports the same metrics.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import torch

from ..common import Aggregation, framework_fused_loss

_FORWARD_LOSS: contextvars.ContextVar[ForwardLoss | None] = contextvars.ContextVar("rank_grpo_openrlhf_forward_loss",
                                                                                   default=None)


@dataclass
class ForwardLoss:
    """One training micro-batch (OpenRLHF's ``experience``, its ``item_ids`` and the step's ``batch_info``:
    ``dp_size``, ``batch_num_tokens``, ``global_batch_size``) under the trainer's ``policy_loss``
    (``RankGRPOPolicyLoss``), ``args`` and KL coefficient ``kl_coef`` (``kl_ctl``); ``run`` fills ``result``
    ((loss, stats), the fused path) or leaves it None (the recompute path)."""

    policy_loss: Any
    args: Any
    kl_coef: float
    experience: Any
    item_ids: torch.Tensor
    batch_info: dict
    result: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    correction: tuple = (None, None, None)  # the rollout correction's weights, vLLM KL and filtered fraction

    @property
    def kl_term(self) -> bool:
        """Whether OpenRLHF's step adds a KL loss term (``--use_kl_loss`` with a positive ``init_kl_coef``)."""
        return bool(self.args.algo.kl.use_loss and self.args.algo.kl.init_coef > 0)

    @property
    def loss_tokens(self) -> int:
        return int((self.experience.action_mask.bool() & (self.item_ids >= 0)).sum())

    def aggregation(self) -> Aggregation:
        info = self.batch_info
        return self.policy_loss.aggregation(info["global_batch_size"], info["dp_size"], info["batch_num_tokens"])

    def options(self) -> dict | None:
        """The KL and entropy keywords of the fused loss that give OpenRLHF's step, or None where it cannot (module
        docstring)."""
        agg, kl, coef = self.aggregation(), self.args.algo.kl, self.args.actor.entropy_coef
        per_token = agg.form == "code" and not agg.per_sample
        options = {}
        if self.kl_term:
            if not per_token or kl.estimator != "k3" or kl.unbiased_gradient:
                return None
            options.update(ref_log_probs=self.experience.base_action_log_probs, beta=float(self.kl_coef))
        if coef is not None:
            bonus = agg.token_bonus_coef(float(coef), self.loss_tokens) if agg.form == "code" else None
            if bonus is None:
                return None
            options.update(entropy_coef=bonus, compute_entropy=True)
        return options

    def run(self, hidden, weight, bias, targets, head: dict) -> torch.Tensor | None:
        """For the actor forward's states ``hidden`` (B, A, H) that predict the action tokens ``targets`` (B, A) and
        its head (``weight``, ``bias``; ``head``: temperature and logit transform): the placeholder log-probs (B, A)
        once the loss is in ``result``, or None where the recompute path runs."""
        options = self.options()
        if options is None:
            return None
        e, mask = self.experience, self.experience.action_mask.bool()
        self.correction = self.policy_loss.rollout_correction(e.action_log_probs, e.rollout_log_probs, mask,
                                                              self.item_ids)
        self.result = framework_fused_loss(
            hidden, weight, targets, self.aggregation(), self.policy_loss.clip, bias=bias, item_ids=self.item_ids,
            advantages=e.advantages, mask=mask, old_log_probs=e.action_log_probs, head=head,
            policy_weights=self.correction[0], **options)
        return (e.base_action_log_probs if self.kl_term else e.action_log_probs).detach()

    def policy_loss_outputs(self):
        """``PolicyLoss``'s five return values for the loss the forward computed (``ppo_kl`` NaN: ``report`` drops
        it)."""
        loss, stats = self.result
        _, vllm_kl, filtered = self.correction
        return loss, stats["clip_ratio_region"].float(), loss.new_tensor(float("nan")).detach(), vllm_kl, filtered

    def report(self, status: dict) -> dict:
        """OpenRLHF's step ``status`` with the fused path's metrics: ``kl`` and ``entropy_loss`` as its token
        aggregates (``aggregate_loss``), ``policy_loss`` the objective without them; ``ppo_kl`` and, with a KL term,
        ``logprobs_diff`` dropped. Unchanged on the recompute path."""
        if self.result is None:
            return status
        (loss, stats), metrics, weights = self.result, status["metrics"], status["weights"]
        info = self.batch_info
        to_aggregate = self.loss_tokens * info["dp_size"] / info["batch_num_tokens"]  # token mean -> aggregate
        policy = loss.detach()
        if "kl" in stats:
            metrics["kl"] = (stats["kl"] * to_aggregate).detach()
            policy = policy - self.kl_coef * metrics["kl"]
        if "entropy" in stats:
            metrics["entropy_loss"] = (stats["entropy"] * to_aggregate).detach()
            policy = policy + self.args.actor.entropy_coef * metrics["entropy_loss"]
        metrics["policy_loss"] = policy
        for name in ("ppo_kl", "logprobs_diff") if self.kl_term else ("ppo_kl",):
            metrics.pop(name, None)
            weights.pop(name, None)
        return status


def current_forward_loss() -> ForwardLoss | None:
    """The micro-batch bound around the running training step, or None."""
    return _FORWARD_LOSS.get()


@contextlib.contextmanager
def bind_forward_loss(forward_loss: ForwardLoss):
    """Within the block the fused actor forward computes this micro-batch's loss (``ForwardLoss.run``)."""
    token = _FORWARD_LOSS.set(forward_loss)
    try:
        yield forward_loss
    finally:
        _FORWARD_LOSS.reset(token)
