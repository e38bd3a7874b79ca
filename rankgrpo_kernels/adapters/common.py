"""What the log-prob frameworks' adapters (OpenRLHF, verl) share: the two forms of the objective and their loss.

Both frameworks hand over per-token log-probs of a micro-batch and aggregate in one of two ways, which map onto our
loss types as follows (B: the micro-batch's rows, ``samples``: the global batch's rows over ``dp_size`` ranks):

- per token, over a token count given by the framework (``token_count``): ``dapo`` with that count; ``bnpo`` (the
  micro-batch's own token mean) when the framework gives none;
- per sample (sequence means) and the paper form: ``grpo`` or ``rank``, whose 1/B is rescaled to the framework's
  ``dp_size / samples``.
"""

from __future__ import annotations

from ..functional import rank_grpo_loss_from_logps

FORMS = ("code", "rank")


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return form


def framework_loss(log_probs, old_log_probs, advantages, mask, item_ids, *, form: str, rec_num: int | None,
                   per_sample: bool, token_count, samples, dp_size: int, epsilon_low: float, epsilon_high: float,
                   delta: float | None, policy_weights=None):
    """The Rank-GRPO loss of a micro-batch (all tensors (B, T)) in the framework's aggregation; returns (loss,
    stats) as ``rank_grpo_loss_from_logps``. ``per_sample``: the framework averages sequence means (ignored by the
    paper form, always per sample); ``token_count``: the framework's divisor of token sums on this rank, or None;
    ``policy_weights``: the framework's rollout importance-sampling weights (B, T), or None."""
    if check_form(form) == "rank":
        loss_type, kwargs = "rank", {"rec_num": rec_num}
    elif per_sample:
        loss_type, kwargs = "grpo", {}
    elif token_count is None:
        loss_type, kwargs = "bnpo", {}
    else:
        loss_type, kwargs = "dapo", {"num_items_in_batch": token_count}
    loss, stats = rank_grpo_loss_from_logps(
        log_probs, item_ids=item_ids, advantages=advantages, completion_mask=mask, old_logps=old_log_probs,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
        policy_weights=policy_weights, **kwargs,
    )
    if loss_type in ("rank", "grpo"):  # our 1/B becomes the framework's dp_size / samples
        loss = loss * (log_probs.shape[0] * dp_size) / samples
    return loss, stats
