"""Policy weights at the item level: importance-sampling corrections and off-policy masks for ``policy_weights=``.

Rank-GRPO's ratio is an item's geometric mean, so its corrections are too. With ``M`` the loss mask and item k a
group of tokens of one row (``item_ids``, as the loss takes them)::

    mean_k(x)              = sum_{t in k, M_t} x_t / |{t in k, M_t}|
    item_importance_weights: w_k = exp(mean_k(old - sampler))         the trainer's over the sampler's probability
        "item_truncate":  min(max(w_k, clip_min), clip_max)            (a None bound: none)
        "item_mask":      w_k where clip_min <= w_k <= clip_max, else 0
    item_off_policy_mask:   1 where a_t >= 0 or mean_k(sampler - policy) <= threshold, else 0

Both are constants (no gradient) of shape (B, T), spread over every token of their item; tokens outside the loss
get 1. A NaN log-prob difference (a token the sampler could not score) counts as 0, as TRL counts it.

Equivalent PyTorch for one item k of row i (``tokens = (item_ids[i] == k) & M[i]``)::

    w = (old[i, tokens] - sampler[i, tokens]).nan_to_num(0).mean().exp()
"""

from __future__ import annotations

import math
import numbers

import torch

from .contract import check_tensor, dense_groups

ITEM_IS_MODES = ("item_truncate", "item_mask")


def _check_token_inputs(item_ids, mask, **float_tensors) -> tuple[int, int]:
    """Named TypeErrors and ValueErrors for the (B, T) inputs of a helper, ``item_ids`` giving (B, T) and the
    device: broadcasting would otherwise pair mismatched tensors silently or fail naming none of them."""
    check_tensor(item_ids, "item_ids", None, "int")
    if item_ids.dim() != 2:
        raise ValueError(f"item_ids must be (B, T), got shape {tuple(item_ids.shape)}")
    check_tensor(mask, "mask", item_ids.shape, "mask", item_ids.device)
    for name, x in float_tensors.items():
        check_tensor(x, name, item_ids.shape, "float", item_ids.device)
    return item_ids.shape


def item_means(values: torch.Tensor, item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): the mean of ``values`` over the loss tokens of each token's item (0 outside the loss)."""
    _check_token_inputs(item_ids, mask, values=values)
    in_loss = mask.bool() & (item_ids >= 0)
    B, T = item_ids.shape
    group = dense_groups(item_ids, in_loss).clamp(min=0).reshape(-1)
    x = torch.where(in_loss, values.detach().nan_to_num(0.0), 0).reshape(-1)
    sums = torch.zeros(B * T, dtype=x.dtype, device=x.device).index_add_(0, group, x)
    counts = torch.zeros(B * T, dtype=x.dtype, device=x.device).index_add_(0, group, in_loss.reshape(-1).to(x.dtype))
    return torch.where(in_loss, (sums / counts.clamp(min=1))[group].view(B, T), 0)


def item_importance_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, item_ids: torch.Tensor,
                            mask: torch.Tensor, mode: str, clip_min: float | None,
                            clip_max: float | None) -> torch.Tensor:
    """(B, T) item-level importance-sampling weights (module docstring), 1 outside the loss."""
    if mode not in ITEM_IS_MODES:
        raise ValueError(f"mode must be one of {ITEM_IS_MODES}, got {mode!r}")
    for name, bound in (("clip_min", clip_min), ("clip_max", clip_max)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, numbers.Real)
                                  or not 0 <= bound < math.inf):
            raise ValueError(f"{name} must be None or a finite number >= 0, got {bound!r}")
    if clip_min is not None and clip_max is not None and clip_min > clip_max:
        raise ValueError(f"clip_min={clip_min!r} must not exceed clip_max={clip_max!r}: no weight would lie "
                         "between them")
    _check_token_inputs(item_ids, mask, old_logps=old_logps, sampler_logps=sampler_logps)
    in_loss = mask.bool() & (item_ids >= 0)
    dtype = torch.promote_types(old_logps.dtype, torch.float32)
    weights = torch.exp(item_means(old_logps.to(dtype) - sampler_logps.to(dtype), item_ids, mask))
    if mode == "item_truncate":
        if clip_min is not None or clip_max is not None:
            weights = weights.clamp(min=clip_min, max=clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        weights = torch.where((weights >= low) & (weights <= high), weights, 0)
    return torch.where(in_loss, weights, 1)


def item_off_policy_mask(policy_logps: torch.Tensor, sampler_logps: torch.Tensor, advantages: torch.Tensor,
                         item_ids: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, T) 0/1: TRL's off-policy sequence mask (DeepSeek-V3.2) per item: an item with a negative advantage
    whose mean KL ``sampler - policy`` exceeds ``threshold`` is dropped; 1 outside the loss. ``advantages`` per
    token (B, T) or per row ((B,) or (B, 1), as the loss reads them)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    B, T = _check_token_inputs(item_ids, mask, policy_logps=policy_logps, sampler_logps=sampler_logps)
    check_tensor(advantages, "advantages", None, "float", item_ids.device)
    if tuple(advantages.shape) in ((B,), (B, 1)):  # one per row: along the rows even when B == T
        advantages = advantages.reshape(B, 1)
    elif tuple(advantages.shape) != (B, T):
        raise ValueError(f"advantages must be (B, T) per token or (B,) or (B, 1) per row with B={B}, T={T}, got "
                         f"{tuple(advantages.shape)}")
    in_loss = mask.bool() & (item_ids >= 0)
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    kl = item_means(sampler_logps.to(dtype) - policy_logps.to(dtype), item_ids, mask)
    keep = (advantages >= 0) | (kl <= threshold)
    return (~in_loss | keep).float()
