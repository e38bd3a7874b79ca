"""autograd.Functions over a backend's ``logprob_forward`` / ``logprob_backward`` and the segment loss.

A backend is a module with

    logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy) -> logp, lse, entropy
    logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs) -> dh, dW, db

over flattened tokens (hidden (N, H), targets (N,)). The loss is always the last op, so its forward already knows
``g = dL/dlogp`` and the backward only scales it by the incoming gradient.
"""

from __future__ import annotations

import torch

from .segment_loss import LossConfig, TokenBatch, segment_loss


class FusedRankGRPOLoss(torch.autograd.Function):
    """(hidden (N, H), weight, bias, targets (N,)) -> (loss, stats) without a (N, V) logits tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, batch: TokenBatch, cfg: LossConfig, temperature, budget, backend):
        logp, lse, _ = backend.logprob_forward(hidden, weight, bias, targets, temperature, budget, False)
        batch.logps = logp.view(batch.mask.shape)
        loss, stats, grad_logp = segment_loss(batch, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, grad_logp.reshape(-1))
        ctx.temperature, ctx.budget, ctx.backend = temperature, budget, backend
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        hidden, weight, bias, targets, lse, grad_logp = ctx.saved_tensors
        d_hidden, d_weight, d_bias = ctx.backend.logprob_backward(
            hidden, weight, bias, targets, ctx.temperature, lse, grad_logp * grad_loss, ctx.budget,
            ctx.needs_input_grad[:3],
        )
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


class FusedLogprobs(torch.autograd.Function):
    """(hidden (N, H), weight, bias, targets (N,)) -> (logp (N,), entropy (N,) or None); entropy has no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, budget, backend, return_entropy):
        logp, lse, entropy = backend.logprob_forward(hidden, weight, bias, targets, temperature, budget, return_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.budget, ctx.backend = temperature, budget, backend
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        d_hidden, d_weight, d_bias = ctx.backend.logprob_backward(
            hidden, weight, bias, targets, ctx.temperature, lse, grad_logp, ctx.budget, ctx.needs_input_grad[:3]
        )
        return d_hidden, d_weight, d_bias, None, None, None, None, None


class RankGRPOLossFromLogps(torch.autograd.Function):
    """(logps (B, T)) -> (loss, stats); the gradient is the segment loss's analytic ``dL/dlogp``."""

    @staticmethod
    def forward(ctx, logps, batch: TokenBatch, cfg: LossConfig):
        batch.logps = logps
        loss, stats, grad_logp = segment_loss(batch, cfg)
        ctx.save_for_backward(grad_logp)
        ctx.logps_dtype = logps.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grad_logp,) = ctx.saved_tensors
        return (grad_logp * grad_loss).to(ctx.logps_dtype), None, None
