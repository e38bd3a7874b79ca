"""TRL's corrections of the policy term, as the weights (B, T) the fused loss multiplies each token's policy term by
(``policy_weights``): the vLLM importance-sampling ratio (TRL's token or sequence modes, or per item), the per-item
off-policy mask and the high-entropy token mask."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...functional import fused_logprobs
from ...importance import ITEM_IS_MODES, item_importance_weights, item_off_policy_mask


def split_is_mode(mode: str) -> tuple[str | None, str]:
    """``(item mode or None, the mode TRL computes)`` of ``vllm_importance_sampling_mode``: for an item mode TRL
    computes (and logs) the token ratios of the same kind, which ``item_sampling_weights`` then replaces."""
    if mode in ITEM_IS_MODES:
        return mode, "token_" + mode.split("_")[1]
    return None, mode


def item_sampling_weights(output: dict, mode: str, clip_min: float, clip_max: float):
    """The item-level vLLM importance-sampling weights (B, T) of TRL's generation ``output``
    (``importance.item_importance_weights``) and their values on the loss tokens (1-D)."""
    mask = output["completion_mask"].bool() & (output["item_ids"] >= 0)
    weights = item_importance_weights(output["old_per_token_logps"], output["sampling_per_token_logps"],
                                      output["item_ids"], mask, mode, clip_min, clip_max)
    return weights, weights[mask]


def policy_weights(inputs: dict, hidden, weight, bias, *, vllm_ratio: bool, off_policy_threshold: float | None,
                   top_entropy_quantile: float, high_entropy_mask: Callable, temperature: float,
                   logit_transform: dict):
    """What multiplies each token's policy term, in TRL's order: the off-policy mask (per item here), the
    high-entropy mask (``high_entropy_mask``: GRPOTrainer's ``get_high_entropy_mask``), the vLLM importance-sampling
    ratio when ``vllm_ratio``; None when none is on. The two masks need the current policy's log-probs or entropies
    before the loss: one more logits GEMM, without gradient.
    Returns (weights, high-entropy mask (B, T) bool, entropies (B, T)); the last two None unless
    ``top_entropy_quantile < 1``."""
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    weights = None
    if vllm_ratio:
        weights = inputs["importance_sampling_ratio"].expand_as(completion_mask).float()
    if off_policy_threshold is None and top_entropy_quantile >= 1.0:
        return weights, None, None
    with torch.no_grad():
        logps, entropies = fused_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                          return_entropy=True, mask=completion_mask, **logit_transform)
    masks = []
    if off_policy_threshold is not None:
        old = inputs.get("old_per_token_logps")
        sampler = inputs.get("sampling_per_token_logps", logps if old is None else old)
        masks.append(item_off_policy_mask(logps, sampler, inputs["advantages"], inputs["item_ids"],
                                          completion_mask, off_policy_threshold))
    high_entropy = None
    if top_entropy_quantile < 1.0:
        high_entropy = high_entropy_mask(entropies, completion_mask, 1 - top_entropy_quantile)
        masks.append(high_entropy.float())
    for extra in masks:
        weights = extra if weights is None else weights * extra
    return weights, high_entropy, None if high_entropy is None else entropies
