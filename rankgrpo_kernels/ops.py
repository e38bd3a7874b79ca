"""``torch.library`` custom ops over the backends, with fake implementations and autograd, so that
``torch.compile(fullgraph=True)`` traces through the loss and ``torch.library.opcheck`` can test it.

rankgrpo::fused_loss       (hidden (N, H), weight, bias, targets (N,), token-level loss inputs (B, T)) ->
                           loss, stats, lse, grad_logp     differentiable in hidden, weight, bias
rankgrpo::fused_logprobs   (hidden, weight, bias, targets) -> logp, lse, entropy    differentiable in logp
rankgrpo::loss_from_logps  (logps (B, T), loss inputs) -> loss, stats, grad_logp    differentiable in logps
rankgrpo::logprob_backward the LM-head gradients from ``grad_logp`` (used by the two backward passes)

The loss is the last op, so its forward already knows ``grad_logp = dL/dlogp``; the backward only scales it by
the incoming gradient. Gradients that are not needed come back from ``logprob_backward`` as empty tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .contract import STAT_NAMES, LossConfig, TokenBatch

_EMPTY = (0,)


def _batch(logps, old_logps, ref_logps, advantages, group, mask, normaliser, entropy):
    return TokenBatch(logps, old_logps, ref_logps, advantages, group, mask, normaliser, entropy)


def _fake_loss_outputs(like: Tensor, B: int, T: int):
    dtype = torch.promote_types(like.dtype, torch.float32)
    return (like.new_empty((), dtype=dtype), like.new_empty((len(STAT_NAMES),), dtype=dtype),
            like.new_empty((B, T), dtype=dtype))


# --- LM-head gradients ---------------------------------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::logprob_backward", mutates_args=())
def logprob_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                     lse: Tensor, grad_logp: Tensor, budget: int, need_hidden: bool, need_weight: bool,
                     need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grads = backends.load(backend).logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp,
                                                    budget, (need_hidden, need_weight, need_bias))
    return tuple(g if g is not None else hidden.new_empty(_EMPTY) for g in grads)


@logprob_backward.register_fake
def _(hidden, weight, bias, targets, temperature, lse, grad_logp, budget, need_hidden, need_weight, need_bias,
      backend):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(_EMPTY),
            torch.empty_like(weight) if need_weight else hidden.new_empty(_EMPTY),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(_EMPTY))


def _head_gradients(ctx, grad_logp):
    hidden, weight, bias, targets, lse = ctx.saved_tensors[:5]
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = logprob_backward(hidden, weight, bias, targets, ctx.temperature, lse, grad_logp,
                                                  ctx.budget, need_hidden, need_weight, need_bias and bias is not None,
                                                  ctx.backend)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias and bias is not None else None)


def _save_head(ctx, inputs, hidden, weight, bias, targets, lse, temperature, budget, backend, *extra):
    ctx.save_for_backward(hidden, weight, bias, targets, lse, *extra)
    ctx.temperature, ctx.budget, ctx.backend, ctx.num_inputs = temperature, budget, backend, len(inputs)


# --- fused loss ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::fused_loss", mutates_args=())
def fused_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
               old_logps: Optional[Tensor], ref_logps: Optional[Tensor], advantages: Tensor, group: Tensor,
               mask: Tensor, normaliser: Tensor, epsilon_low: float, epsilon_high: float, delta: Optional[float],
               beta: float, loss_type: str, temperature: float, compute_entropy: bool, budget: int,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.load(backend)
    logp, lse, entropy = impl.logprob_forward(hidden, weight, bias, targets, temperature, budget, compute_entropy)
    entropy = entropy.view(mask.shape) if entropy is not None else None
    batch = _batch(logp.view(mask.shape), old_logps, ref_logps, advantages, group, mask, normaliser, entropy)
    loss, stats, grad_logp = impl.segment_loss(batch, LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type))
    return loss, stats, lse, grad_logp


@fused_loss.register_fake
def _(hidden, weight, bias, targets, old_logps, ref_logps, advantages, group, mask, normaliser, epsilon_low,
      epsilon_high, delta, beta, loss_type, temperature, compute_entropy, budget, backend):
    loss, stats, grad = _fake_loss_outputs(hidden, *mask.shape)
    return loss, stats, hidden.new_empty((hidden.shape[0],), dtype=grad.dtype), grad


def _fused_loss_setup(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    temperature, _, budget, backend = inputs[-4:]
    _save_head(ctx, inputs, hidden, weight, bias, targets, output[2], temperature, budget, backend, output[3])


def _fused_loss_backward(ctx, grad_loss, _stats, _lse, _grad_logp):
    grad_logp = ctx.saved_tensors[5]
    return (*_head_gradients(ctx, grad_logp.reshape(-1) * grad_loss), *([None] * (ctx.num_inputs - 3)))


fused_loss.register_autograd(_fused_loss_backward, setup_context=_fused_loss_setup)


# --- fused log-probs -----------------------------------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::fused_logprobs", mutates_args=())
def fused_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                   budget: int, return_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    logp, lse, entropy = backends.load(backend).logprob_forward(hidden, weight, bias, targets, temperature, budget,
                                                                return_entropy)
    return logp, lse, entropy if entropy is not None else lse.new_empty(_EMPTY)


@fused_logprobs.register_fake
def _(hidden, weight, bias, targets, temperature, budget, return_entropy, backend):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    N = hidden.shape[0]
    return (hidden.new_empty((N,), dtype=dtype), hidden.new_empty((N,), dtype=dtype),
            hidden.new_empty((N,) if return_entropy else _EMPTY, dtype=dtype))


def _fused_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, budget, _, backend = inputs
    _save_head(ctx, inputs, hidden, weight, bias, targets, output[1], temperature, budget, backend)


def _fused_logprobs_backward(ctx, grad_logp, _lse, _entropy):
    return (*_head_gradients(ctx, grad_logp), *([None] * (ctx.num_inputs - 3)))


fused_logprobs.register_autograd(_fused_logprobs_backward, setup_context=_fused_logprobs_setup)


# --- loss from log-probs -------------------------------------------------------------------------------------------

@torch.library.custom_op("rankgrpo::loss_from_logps", mutates_args=())
def loss_from_logps(logps: Tensor, old_logps: Optional[Tensor], ref_logps: Optional[Tensor], advantages: Tensor,
                    group: Tensor, mask: Tensor, normaliser: Tensor, entropy: Optional[Tensor], epsilon_low: float,
                    epsilon_high: float, delta: Optional[float], beta: float, loss_type: str,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    batch = _batch(logps, old_logps, ref_logps, advantages, group, mask, normaliser, entropy)
    return backends.load(backend).segment_loss(batch, LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type))


@loss_from_logps.register_fake
def _(logps, old_logps, ref_logps, advantages, group, mask, normaliser, entropy, epsilon_low, epsilon_high, delta,
      beta, loss_type, backend):
    return _fake_loss_outputs(logps, *logps.shape)


def _loss_from_logps_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.logps_dtype, ctx.num_inputs = inputs[0].dtype, len(inputs)


def _loss_from_logps_backward(ctx, grad_loss, _stats, _grad_logp):
    (grad_logp,) = ctx.saved_tensors
    return ((grad_logp * grad_loss).to(ctx.logps_dtype), *([None] * (ctx.num_inputs - 1)))


loss_from_logps.register_autograd(_loss_from_logps_backward, setup_context=_loss_from_logps_setup)
