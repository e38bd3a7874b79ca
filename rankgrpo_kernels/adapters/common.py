"""What the log-prob frameworks' adapters (OpenRLHF, verl) share: the two forms of the objective, how the
frameworks' aggregation maps onto our loss types, and the loss on the fused path and on the recompute path.

Both frameworks aggregate per-token terms in one of two ways, which map onto our loss types as follows (B: the
micro-batch's rows, ``samples``: the global batch's rows over ``dp_size`` ranks):

- per token, over a token count given by the framework (``token_count``): ``dapo`` with that count; ``bnpo`` (the
  micro-batch's own token mean) when the framework gives none;
- per sample (sequence means) and the paper form: ``grpo`` or ``rank``, whose 1/B is rescaled to the framework's
  ``dp_size / samples``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..functional import rank_grpo_loss, rank_grpo_loss_from_logps
from .hf_model import call_head

FORMS = ("code", "rank")


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form


@dataclass(frozen=True)
class Aggregation:
    """How a framework aggregates a micro-batch's per-token terms (module docstring), as our loss type.

    ``per_sample``: the framework averages sequence means (ignored by the paper form, always per sample);
    ``token_count``: the framework's divisor of token sums on this rank, or None; ``samples``: the global batch's
    rows; ``rec_num``: N, for the paper form."""

    form: str
    per_sample: bool
    token_count: float | torch.Tensor | None
    samples: float | torch.Tensor
    dp_size: int
    rec_num: int | None = None

    def __post_init__(self):
        check_form(self.form)
        if self.form == "rank" and self.rec_num is None:
            raise ValueError("form='rank' (the paper form) needs rec_num, the N of -(1/(B N)) sum_k ...")

    def loss_kwargs(self) -> dict:
        """``loss_type`` and its normaliser, as ``rank_grpo_loss*`` take them."""
        if self.form == "rank":
            return {"loss_type": "rank", "rec_num": self.rec_num}
        if self.per_sample:
            return {"loss_type": "grpo"}
        if self.token_count is None:
            return {"loss_type": "bnpo"}
        return {"loss_type": "dapo", "num_items_in_batch": self.token_count}

    def rescale(self, loss: torch.Tensor, rows: int) -> torch.Tensor:
        """Our 1/B of ``grpo`` and ``rank`` becomes the framework's ``dp_size / samples``."""
        if self.form == "rank" or self.per_sample:
            return loss * (rows * self.dp_size) / self.samples
        return loss

    def token_bonus_coef(self, coef: float, loss_tokens: int) -> float | None:
        """The fused loss's ``entropy_coef`` (a mean over the micro-batch's ``loss_tokens``) that equals the
        framework's ``coef`` times its per-token aggregation of the entropy; None where the framework averages
        sequence means, which one coefficient cannot express (nor the paper form, whose loss tokens are not the
        response's)."""
        if coef == 0.0:
            return 0.0
        if self.form == "rank" or self.per_sample:
            return None
        return coef if self.token_count is None else coef * loss_tokens / float(self.token_count)


@dataclass(frozen=True)
class Clip:
    """The framework's clip range (``epsilon_low``, ``epsilon_high``) and dual clip (``delta``, None: off)."""

    epsilon_low: float
    epsilon_high: float
    delta: float | None


def framework_loss(log_probs, old_log_probs, advantages, mask, item_ids, aggregation: Aggregation, clip: Clip,
                   policy_weights=None):
    """The Rank-GRPO loss of a micro-batch from its log-probs (all tensors (B, T)) in the framework's
    ``aggregation``; returns (loss, stats) as ``rank_grpo_loss_from_logps``. ``policy_weights``: the framework's
    rollout importance-sampling weights (B, T), or None."""
    loss, stats = rank_grpo_loss_from_logps(
        log_probs, item_ids=item_ids, advantages=advantages, completion_mask=mask, old_logps=old_log_probs,
        epsilon_low=clip.epsilon_low, epsilon_high=clip.epsilon_high, delta=clip.delta,
        policy_weights=policy_weights, **aggregation.loss_kwargs(),
    )
    return aggregation.rescale(loss, log_probs.shape[0]), stats


def framework_fused_loss(hidden, weight, targets, aggregation: Aggregation, clip: Clip, *, item_ids, advantages,
                         mask, old_log_probs, head: dict, bias=None, ref_log_probs=None, beta: float = 0.0,
                         entropy_coef: float = 0.0, compute_entropy: bool = False, policy_weights=None):
    """The same loss on the fused path: ``rank_grpo_loss`` on the states (B, T, H) that predict ``targets`` and the
    head ``weight`` (and ``bias``), in the head's dtype with autocast off (``call_head``). ``head``: the temperature
    and the model's logit transform; ``beta`` weights the k3 KL to ``ref_log_probs`` as the policy terms are
    weighted; ``entropy_coef`` as ``rank_grpo_loss`` takes it (``Aggregation.token_bonus_coef``)."""

    def loss_fn(h, w, b):
        return rank_grpo_loss(
            h, w, targets, bias=b, item_ids=item_ids, advantages=advantages, completion_mask=mask,
            old_logps=old_log_probs, ref_logps=ref_log_probs, beta=beta, epsilon_low=clip.epsilon_low,
            epsilon_high=clip.epsilon_high, delta=clip.delta, policy_weights=policy_weights,
            entropy_coef=entropy_coef, compute_entropy=compute_entropy, **aggregation.loss_kwargs(), **head)

    loss, stats = call_head(loss_fn, hidden, weight, bias)
    return aggregation.rescale(loss, hidden.shape[0]), stats

