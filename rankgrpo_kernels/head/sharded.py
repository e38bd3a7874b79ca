"""Vocabulary-parallel LM heads: each rank holds rows ``[start_r, start_r + V_r)`` of the head (uneven shards are
fine) and the loss never gathers the head or a (tokens x vocab) tensor.

Per token, rank r runs its backend on its shard and gets ``lse_r`` (log-sum-exp over its rows), the target logit
``z_y`` if the target is one of its rows (0 otherwise) and, for the entropy, ``E_r[z]`` under its local softmax.
Three all-reduces combine them:

    lse = log sum_r exp(lse_r)             (max, then sum of exp(lse_r - max))
    logp = sum_r z_y,r - lse
    entropy = lse - sum_r exp(lse_r - lse) E_r[z]

The O(N) segment loss then runs identically on every rank. In the backward each rank forms ``D`` for its rows with
the global ``lse`` (and, for the entropy's gradient, the global entropy), keeps ``d_weight`` and ``d_bias`` local
and all-reduces ``d_hidden``. Since this lives at the level of the log-probs (``recompute.py``), it
works for every backend.

Equivalent PyTorch (on one rank holding the whole head)::

    logp = ((hidden @ weight.T + bias) / T).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..specs import HeadSpec
from .recompute import logprob_grads, logprobs


def shard_range(weight: torch.Tensor, group) -> tuple[int, int]:
    """(first row of this rank's shard, total vocabulary): shards are laid out in rank order."""
    rank = dist.get_rank(group)
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=weight.device)
    sizes[rank] = weight.shape[0]
    sizes = _all_reduce(sizes, dist.ReduceOp.SUM, group)  # one small collective per call (and one host sync)
    return int(sizes[:rank].sum()), int(sizes.sum())


def check_not_sharded_parameter(weight: torch.Tensor) -> None:
    """Refuse heads that FSDP2 or DeepSpeed ZeRO-3 shard, naming the fix: this library wants the rank's rows."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        DTensor = ()
    if isinstance(weight, DTensor):
        raise TypeError(
            "weight is an FSDP2/DTensor parameter. Pass the gathered head, "
            "weight.full_tensor(grad_placements=[Partial('avg')] * weight.device_mesh.ndim) (the averaged gradient "
            "FSDP2 gives its parameters; plain full_tensor() keeps this rank's gradient only), or call the loss "
            "inside the FSDP module's forward where the head is unsharded, or pass a vocabulary shard "
            "(weight.to_local() of a Shard(0) placement) with process_group= set"
        )
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        raise TypeError(
            "weight is a DeepSpeed ZeRO-3 partitioned parameter (no data on this rank). Gather it for the step with "
            "deepspeed.zero.GatheredParameters([weight]) or keep the head unpartitioned "
            "(stage3_param_persistence_threshold above its size)"
        )


def _device_for_collectives(tensor: torch.Tensor, group) -> torch.Tensor:
    return tensor if dist.get_backend(group) != "gloo" or tensor.device.type == "cpu" else tensor.cpu()


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    moved = _device_for_collectives(tensor, group)
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(tensor.device) if moved is not tensor else tensor


class ShardedLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight shard (V_r, H), bias shard, global targets (N,), listed (N,) bool or None, the
    shard's first row) -> (logp (N,), entropy (N,) or None). Only the listed tokens enter the GEMMs (one host sync
    to list them); the others get 0."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, listed, vocab_start, head: HeadSpec, compute_entropy, group):
        local_targets = targets - vocab_start  # outside [0, V_r): another rank's row
        owned = (local_targets >= 0) & (local_targets < weight.shape[0])
        if weight.shape[0]:
            positions = None if listed is None else listed.nonzero().squeeze(1)
            logp_r, lse_r, entropy_r = logprobs(hidden, weight, bias, local_targets, head, compute_entropy, positions)
        else:  # an empty shard holds no probability mass
            lse_r = torch.full(targets.shape, float("-inf"), dtype=torch.promote_types(hidden.dtype, torch.float32),
                               device=hidden.device)
            logp_r, entropy_r = torch.zeros_like(lse_r), torch.zeros_like(lse_r)
        # z_y = logp_r + lse_r on the rank owning the target, exactly 0 on the others (no inf - inf).
        target_logit = _all_reduce(torch.where(owned, logp_r + lse_r, 0), dist.ReduceOp.SUM, group)
        lse_max = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)
        lse = lse_max + torch.log(_all_reduce(torch.exp(lse_r - lse_max), dist.ReduceOp.SUM, group))
        entropy = None
        if compute_entropy:
            share = torch.exp(lse_r - lse)  # this shard's probability mass
            mean_logit = torch.where(share > 0, share * (lse_r - entropy_r), 0)
            entropy = lse - _all_reduce(mean_logit, dist.ReduceOp.SUM, group)
        logp = target_logit - lse
        if listed is not None:
            logp = torch.where(listed, logp, 0)
            entropy = torch.where(listed, entropy, 0) if entropy is not None else None
        ctx.save_for_backward(hidden, weight, bias, local_targets, lse, entropy, listed)
        ctx.head, ctx.group = head, group
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, local_targets, lse, entropy, listed = ctx.saved_tensors
        group = ctx.group
        if entropy is None:
            grad_entropy = None
        if listed is not None:  # the unlisted tokens' log-probs and entropies are the constant 0
            grad_logp = torch.where(listed, grad_logp, 0)
            grad_entropy = None if grad_entropy is None else torch.where(listed, grad_entropy, 0)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        if weight.shape[0]:  # the global lse and entropy: this shard's columns of the whole row's gradient
            d_hidden, d_weight, d_bias = logprob_grads(hidden, weight, bias, local_targets, ctx.head, lse, grad_logp,
                                                       needs, entropy, grad_entropy)
        else:
            d_hidden = torch.zeros_like(hidden) if needs[0] else None
            d_weight = torch.zeros_like(weight) if needs[1] else None
            d_bias = torch.zeros_like(bias) if needs[2] else None
        if d_hidden is not None:  # every rank holds part of each token's d_hidden: sum them in fp32
            summed = _all_reduce(d_hidden.to(torch.promote_types(d_hidden.dtype, torch.float32)),
                                 dist.ReduceOp.SUM, group)
            d_hidden = summed.to(hidden.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


def sharded_logprobs(hidden2d, weight, bias, targets, listed, vocab_start, head: HeadSpec, compute_entropy, group):
    """Log-probs (N,) and entropies (N,) or None over a vocabulary-parallel head, both differentiable; ``head``
    resolved (a backend name, an int budget); see the module docstring."""
    return ShardedLogprobs.apply(hidden2d, weight, bias, targets, listed, vocab_start, head, compute_entropy, group)
