"""Input checks at the public boundary and the token-level batch the ops take.

Every check names the argument it refuses. Shape, dtype and device checks are free; value checks (NaN, ids in
range) are collected as 0-dim flags and read with one host sync (``raise_on_bad_values``), skipped under
``torch.compile`` and with ``RANKGRPO_VALIDATE=0``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import backends
from .contract import WINDOW_TOKEN_NORMALISED, TokenBatch, check_tensor, dense_groups
from .head.sharded import check_not_sharded_parameter
from .settings import memory_budget, validate_values
from .specs import HeadSpec, LossSpec


def raise_on_bad_values(checks):
    """One host sync for all value checks: ``checks`` is a list of (message, bool 0-dim tensor that is True if bad)."""
    if not checks or not validate_values() or torch.compiler.is_compiling():
        return
    flags = torch.stack([flag for _, flag in checks]).tolist()
    for (message, _), bad in zip(checks, flags):
        if bad:
            raise ValueError(message)


def per_token_advantages(advantages, item_ids, advantage_level, B, T):
    """(B, T) advantages from per-token, per-row ((B,) or (B, 1)) or, with ``advantage_level="rank"``, per-rank
    (B, K) ones (token t takes ``advantages[b, item_ids[b, t]]``, 0 for ids >= K); and the per-rank tensor or None."""
    if advantage_level not in ("auto", "rank"):
        raise ValueError(f"advantage_level must be 'auto' or 'rank', got {advantage_level!r}")
    if advantage_level == "rank":
        if advantages.dim() != 2 or advantages.shape[0] != B or advantages.shape[1] < 1:
            raise ValueError(f"advantages per rank must be (B, K) with B={B}, K >= 1; got {tuple(advantages.shape)}")
        K = advantages.shape[1]
        in_range = (item_ids >= 0) & (item_ids < K)
        return torch.where(in_range, advantages.gather(1, item_ids.long().clamp(0, K - 1)), 0), advantages
    if tuple(advantages.shape) in ((B,), (B, 1)):  # one advantage per row, as TRL passes them
        return advantages.reshape(B, 1).expand(B, T), None
    if tuple(advantages.shape) == (B, T):
        return advantages, None
    raise ValueError(
        f"advantages must be (B,) or (B, 1) per row or (B, T) per token with B={B}, T={T}, or (B, K) per rank "
        f"with advantage_level='rank'; got {tuple(advantages.shape)}"
    )


def _scalar(value, dtype, device):
    """A 0-dim tensor of a host number, written on the device by a fill kernel: ``torch.tensor(value, device=cuda)``
    would copy it from the host, a sync on every call."""
    return torch.full((), value, dtype=dtype, device=device)


def normaliser(spec: LossSpec, mask, dtype, *, num_items_in_batch, per_rank):
    """The scalar of the loss type (see ``TokenBatch``). No host sync: host numbers are filled in on the device,
    a ``num_items_in_batch`` tensor is only converted, and its check is a flag read with the others."""
    B, T = mask.shape
    device = mask.device
    if spec.loss_type in ("grpo", "sapo", "luspo"):
        return _scalar(float(B), dtype, device)
    if spec.loss_type == "bnpo":
        return mask.sum().clamp(min=1).to(dtype)
    if spec.loss_type == "dr_grpo":
        length = T if spec.max_completion_length is None else spec.max_completion_length
        return _scalar(float(B * length), dtype, device)
    if spec.loss_type in WINDOW_TOKEN_NORMALISED:
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={spec.loss_type!r} needs num_items_in_batch (the step's total count of loss "
                             "tokens)")
        if not isinstance(num_items_in_batch, torch.Tensor) and not (0 < float(num_items_in_batch) < math.inf):
            raise ValueError(f"num_items_in_batch must be a finite number > 0, got {num_items_in_batch!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a 1-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            return num_items_in_batch.to(device=device, dtype=dtype).reshape(())
        return _scalar(float(num_items_in_batch), dtype, device)
    n_ranks = spec.rec_num if spec.rec_num is not None else (per_rank.shape[1] if per_rank is not None else None)
    if n_ranks is None:
        raise ValueError("loss_type='rank' needs rec_num (N) when advantages are not per rank")
    return _scalar(float(B * n_ranks), dtype, device)


def token_batch(B, T, device, spec: LossSpec, *, item_ids, advantages, completion_mask=None, old_logps=None,
                ref_logps=None, advantage_level="auto", num_items_in_batch=None, entropy=None, logps=None,
                policy_weights=None, entropy_mask=None):
    """Validate the loss inputs and bring them to the token level; returns the ``TokenBatch`` (``logps`` as given,
    None for the fused path) and the value checks."""
    check_tensor(item_ids, "item_ids", (B, T), "int", device)
    check_tensor(advantages, "advantages", None, "float", device)
    check_tensor(completion_mask, "completion_mask", (B, T), None, device, optional=True)
    check_tensor(old_logps, "old_logps", (B, T), "float", device, optional=True)
    check_tensor(ref_logps, "ref_logps", (B, T), "float", device, optional=True)
    check_tensor(entropy, "entropy", (B, T), "float", device, optional=True)
    check_tensor(policy_weights, "policy_weights", (B, T), "float", device, optional=True)
    check_tensor(entropy_mask, "entropy_mask", (B, T), "mask", device, optional=True)
    if spec.beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={spec.beta} needs ref_logps (or set beta=0.0)")

    mask = item_ids >= 0
    if completion_mask is not None:
        mask = mask & completion_mask.bool()
    per_token, per_rank = per_token_advantages(advantages, item_ids, advantage_level, B, T)
    dtype = torch.promote_types(advantages.dtype, torch.float32)
    scale = normaliser(spec, mask, dtype, num_items_in_batch=num_items_in_batch, per_rank=per_rank)

    checks = [("advantages must be finite on tokens in the loss", (~torch.isfinite(per_token) & mask).any())]
    if logps is not None:  # a non-finite log-prob would otherwise reach the loss (docs/design.md, "Non-finite inputs")
        checks.append(("logps must be finite on tokens in the loss", (~torch.isfinite(logps) & mask).any()))
    if old_logps is not None:  # +inf and -inf in one item would make its mean log-ratio inf - inf = NaN
        checks.append(("old_logps must be finite on tokens in the loss", (~torch.isfinite(old_logps) & mask).any()))
    if ref_logps is not None:  # an infinite one gives a well-defined KL: +inf for -inf, a clamped ratio for +inf
        checks.append(("ref_logps contain NaN on tokens in the loss", (torch.isnan(ref_logps) & mask).any()))
    if policy_weights is not None:
        policy_weights = policy_weights.detach()
        checks.append(("policy_weights must be finite and >= 0 on tokens in the loss",
                       ~((policy_weights >= 0) & torch.isfinite(policy_weights) | ~mask).all()))
    if spec.loss_type in WINDOW_TOKEN_NORMALISED and isinstance(num_items_in_batch, torch.Tensor):
        checks.append(("num_items_in_batch must be finite and > 0", ~((scale > 0) & torch.isfinite(scale))))

    batch = TokenBatch(logps, old_logps, ref_logps, per_token, dense_groups(item_ids, mask), mask, scale,
                       mask.sum().clamp(min=1).to(dtype), entropy, policy_weights,
                       None if entropy_mask is None else entropy_mask.bool())
    return batch, checks


def check_head(hidden, weight, target_ids, bias):
    """Validate the LM-head inputs; returns (B, T)."""
    check_tensor(hidden, "hidden", None, "float")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    check_tensor(weight, "weight", None, "float", hidden.device)
    check_not_sharded_parameter(weight)
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (V, H) with H={H} (hidden's last dim), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    check_tensor(target_ids, "target_ids", (B, T), "int", hidden.device)
    if target_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target_ids must be int64 or int32, got {target_ids.dtype}")
    check_tensor(bias, "bias", (weight.shape[0],), "float", hidden.device, optional=True)
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    return B, T


def resolve_head(head: HeadSpec, device: torch.device, dtype: torch.dtype) -> HeadSpec:
    """``head`` for the tensors of one call: ``backend="auto"`` resolved (a backend that cannot run there is
    refused, naming the fix) and the memory budget an int (``settings.memory_budget``)."""
    return dataclasses.replace(head, backend=backends.choose(head.backend, device, dtype),
                               memory_budget_bytes=memory_budget(head.memory_budget_bytes, device))


def target_checks(target_ids, vocab, mask):
    out_of_range = ((target_ids < 0) | (target_ids >= vocab)) & mask
    return [(f"target_ids must lie in [0, V) = [0, {vocab}) on tokens in the loss", out_of_range.any())]
