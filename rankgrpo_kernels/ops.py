"""``torch.library`` custom ops over ``lm_head`` and the backends, with fake implementations and autograd, so that
``torch.compile(fullgraph=True)`` traces through the loss and ``torch.library.opcheck`` can test it.

rankgrpo::fused_loss       (hidden (N, H), weight, bias, targets (N,), token-level loss inputs (B, T)) ->
                           loss, stats, row_clipped (B, 2), d_hidden, d_weight, d_bias    the gradients are formed
                           in the forward
rankgrpo::fused_logprobs   (hidden, weight, bias, targets, mask) -> logp, lse, entropy  differentiable in logp
                           and entropy (0 where mask is False: those tokens enter no GEMM)
rankgrpo::logprob_grads    the LM-head gradients from ``grad_logp`` (the recompute path's backward)
rankgrpo::loss_from_logps  (logps (B, T), loss inputs) -> loss, stats, row_clipped, grad_logp    differentiable in
                           logps

The loss is the last op, so its forward already knows every gradient; its backward only scales them by the
incoming gradient, in place (the saved gradients are spent: a second backward through the same graph raises).
Gradients that are not needed come back as empty tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, lm_head
from .contract import STAT_NAMES, LogitTransform, LossConfig, TokenBatch

_EMPTY = (0,)


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(_EMPTY)


def _fake_loss_outputs(like: Tensor, mask: Tensor):
    """loss, stats and the per-row clip counts (B, 2)."""
    dtype = lm_head.accumulator_dtype(like.dtype)
    return (like.new_empty((), dtype=dtype), like.new_empty((len(STAT_NAMES),), dtype=dtype),
            like.new_empty((mask.shape[0], 2), dtype=dtype))


# --- fused loss: the gradient in the forward -----------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::fused_loss", mutates_args=())
def fused_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
               old_logps: Optional[Tensor], ref_logps: Optional[Tensor], advantages: Tensor,
               policy_weights: Optional[Tensor], group: Tensor, mask: Tensor, normaliser: Tensor, tokens: Tensor,
               epsilon_low: float, epsilon_high: float, delta: Optional[float], beta: float, loss_type: str,
               temperature: float, logit_scale: float, softcap: Optional[float], compute_entropy: bool,
               entropy_coef: float, entropy_mask: Optional[Tensor], skip_zero_advantage: bool, budget: int,
               need_hidden: bool, need_weight: bool, need_bias: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch = TokenBatch(None, old_logps, ref_logps, advantages, group, mask, normaliser, tokens, None, policy_weights)
    loss, stats, row_clipped, *grads = lm_head.loss_and_grads(
        backend, hidden, weight, bias, targets, batch, LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type),
        LogitTransform(temperature, logit_scale, softcap), compute_entropy, entropy_coef, entropy_mask,
        skip_zero_advantage, budget, (need_hidden, need_weight, need_bias and bias is not None))
    return (loss, stats, row_clipped, *(_empty_if_none(g, hidden) for g in grads))


@fused_loss.register_fake
def _(hidden, weight, bias, targets, old_logps, ref_logps, advantages, policy_weights, group, mask, normaliser, tokens,
      epsilon_low, epsilon_high, delta, beta, loss_type, temperature, logit_scale, softcap, compute_entropy,
      entropy_coef, entropy_mask, skip_zero_advantage, budget, need_hidden, need_weight, need_bias, backend):
    dtype = lm_head.saved_grad_dtype(hidden.dtype)
    return (*_fake_loss_outputs(hidden, mask),
            hidden.new_empty(hidden.shape, dtype=dtype) if need_hidden else hidden.new_empty(_EMPTY),
            weight.new_empty(weight.shape, dtype=dtype) if need_weight else hidden.new_empty(_EMPTY),
            bias.new_empty(bias.shape, dtype=dtype) if need_bias and bias is not None else hidden.new_empty(_EMPTY))


def _fused_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])
    need_hidden, need_weight, need_bias = inputs[-4:-1]  # the arguments before ``backend``
    ctx.needs = (need_hidden, need_weight, need_bias and inputs[2] is not None)
    ctx.input_dtype = inputs[0].dtype
    ctx.num_inputs, ctx.spent = len(inputs), False


def _fused_loss_backward(ctx, grad_loss, _stats, _row_clipped, _d_hidden, _d_weight, _d_bias):
    if ctx.spent:
        raise RuntimeError("rank_grpo_loss forms its gradients in the forward and scales them in place in the "
                           "backward, so its graph runs backward once: call the loss again instead of "
                           "retain_graph=True")
    compiling = torch.compiler.is_compiling()
    grads = []
    for saved, needed in zip(ctx.saved_tensors, ctx.needs):
        if not needed:
            grads.append(None)
        elif type(saved) is torch.Tensor and not compiling:
            # Eager: in place, so the backward's peak holds no second (N, H) and (V, H) tensor; on a CPU, where
            # reading the incoming gradient costs no device sync, a gradient of 1 (loss.backward()) skips the pass.
            if not (saved.device.type == "cpu" and grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
                saved.mul_(grad_loss.to(saved.dtype))
            grads.append(saved.to(ctx.input_dtype))  # fp16 inputs: fp32 gradients cast after the loss scale
            ctx.spent = True
        else:  # traced (torch.compile, opcheck): out of place, and the compiler plans the memory
            grads.append((saved * grad_loss.to(saved.dtype)).to(ctx.input_dtype))
    return (*grads, *([None] * (ctx.num_inputs - 3)))


fused_loss.register_autograd(_fused_loss_backward, setup_context=_fused_loss_setup)


# --- the recompute path: log-probs, and their gradients in the backward -------------------------------------------

@torch.library.custom_op("rankgrpo::logprob_grads", mutates_args=())
def logprob_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                  logit_scale: float, softcap: Optional[float], lse: Tensor, grad_logp: Tensor,
                  entropy: Optional[Tensor], grad_entropy: Optional[Tensor], budget: int, need_hidden: bool,
                  need_weight: bool, need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grads = lm_head.logprob_grads(backend, hidden, weight, bias, targets,
                                  LogitTransform(temperature, logit_scale, softcap), lse, grad_logp, budget,
                                  (need_hidden, need_weight, need_bias), entropy, grad_entropy)
    return tuple(_empty_if_none(g, hidden) for g in grads)


@logprob_grads.register_fake
def _(hidden, weight, bias, targets, temperature, logit_scale, softcap, lse, grad_logp, entropy, grad_entropy,
      budget, need_hidden, need_weight, need_bias, backend):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(_EMPTY),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(_EMPTY),
            bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(_EMPTY))


@torch.library.custom_op("rankgrpo::fused_logprobs", mutates_args=())
def fused_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Optional[Tensor],
                   temperature: float, logit_scale: float, softcap: Optional[float], budget: int,
                   return_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    positions = None if mask is None else mask.nonzero().squeeze(1)  # the sizes: one host sync
    logp, lse, entropy = lm_head.logprobs(backend, hidden, weight, bias, targets,
                                          LogitTransform(temperature, logit_scale, softcap), budget,
                                          return_entropy, positions)
    return logp, lse, _empty_if_none(entropy, lse)


@fused_logprobs.register_fake
def _(hidden, weight, bias, targets, mask, temperature, logit_scale, softcap, budget, return_entropy, backend):
    dtype = lm_head.accumulator_dtype(hidden.dtype)
    N = hidden.shape[0]
    return (hidden.new_empty((N,), dtype=dtype), hidden.new_empty((N,), dtype=dtype),
            hidden.new_empty((N,) if return_entropy else _EMPTY, dtype=dtype))


def _fused_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, mask, temperature, logit_scale, softcap, budget, return_entropy, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[2] if return_entropy else None, mask)
    ctx.settings = (temperature, logit_scale, softcap)
    ctx.budget, ctx.backend, ctx.num_inputs = budget, backend, len(inputs)


def _fused_logprobs_backward(ctx, grad_logp, _lse, grad_entropy):
    hidden, weight, bias, targets, lse, entropy, mask = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    if entropy is None:
        grad_entropy = None
    if mask is not None:  # the unlisted tokens' log-probs and entropies are the constant 0
        grad_logp = torch.where(mask, grad_logp, 0)
        grad_entropy = None if grad_entropy is None else torch.where(mask, grad_entropy, 0)
    d_hidden, d_weight, d_bias = logprob_grads(hidden, weight, bias, targets, *ctx.settings, lse, grad_logp, entropy,
                                               grad_entropy, ctx.budget, need_hidden, need_weight, need_bias,
                                               ctx.backend)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            *([None] * (ctx.num_inputs - 3)))


fused_logprobs.register_autograd(_fused_logprobs_backward, setup_context=_fused_logprobs_setup)


# --- loss from log-probs -------------------------------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::loss_from_logps", mutates_args=())
def loss_from_logps(logps: Tensor, old_logps: Optional[Tensor], ref_logps: Optional[Tensor], advantages: Tensor,
                    policy_weights: Optional[Tensor], group: Tensor, mask: Tensor, normaliser: Tensor, tokens: Tensor,
                    entropy: Optional[Tensor], epsilon_low: float, epsilon_high: float, delta: Optional[float],
                    beta: float, loss_type: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch = TokenBatch(logps, old_logps, ref_logps, advantages, group, mask, normaliser, tokens, entropy,
                       policy_weights)
    loss, stats, grad_logp, row_clipped = backends.load(backend).segment_loss(
        batch, LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type))
    return loss, stats, row_clipped, grad_logp


@loss_from_logps.register_fake
def _(logps, old_logps, ref_logps, advantages, policy_weights, group, mask, normaliser, tokens, entropy, epsilon_low,
      epsilon_high, delta, beta, loss_type, backend):
    return (*_fake_loss_outputs(logps, mask),
            logps.new_empty(logps.shape, dtype=lm_head.accumulator_dtype(logps.dtype)))


def _loss_from_logps_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])
    ctx.logps_dtype, ctx.num_inputs = inputs[0].dtype, len(inputs)


def _loss_from_logps_backward(ctx, grad_loss, _stats, _row_clipped, _grad_logp):
    (grad_logp,) = ctx.saved_tensors
    return ((grad_logp * grad_loss).to(ctx.logps_dtype), *([None] * (ctx.num_inputs - 1)))


loss_from_logps.register_autograd(_loss_from_logps_backward, setup_context=_loss_from_logps_setup)
