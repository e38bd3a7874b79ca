"""``torch.library`` custom ops over the head and the backends, with fake implementations and autograd, so that
``torch.compile(fullgraph=True)`` traces through the loss and ``torch.library.opcheck`` can test it.

Each op's argument list is derived from dataclass fields (``boundary.py``): a few plain arguments, then the fields of
``TokenBatch``, ``LossSpec`` and ``HeadSpec`` (resolved: a backend name and an int budget) in declaration order.
The Python wrappers of ``Ops`` flatten the specs once; each implementation and autograd hook rebuilds them once, by
field name. A new spec field therefore reaches the head and every backend without any change here.

fused_loss       (hidden (N, H), weight, bias, targets (N,), batch, loss spec, head spec) -> loss, stats,
                 row_clipped (B, 2), computed (the tokens that entered the GEMMs), d_hidden, d_weight, d_bias
                 the gradients are formed in the forward
fused_logprobs   (hidden, weight, bias, targets, mask, head spec) -> logp, lse, entropy    differentiable in logp
                 and entropy (0 where mask is False: those tokens enter no GEMM)
logprob_grads    the head's gradients from ``grad_logp`` (the recompute path's backward)
loss_from_logps  (batch with logps (B, T), loss spec, head spec) -> loss, stats, row_clipped, grad_logp
                 differentiable in logps

The loss is the last op, so its forward already knows every gradient; its backward only scales them by the
incoming gradient, in place (the saved gradients are spent: a second backward through the same graph raises).
Gradients that are not needed come back as empty tensors.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import backends
from .boundary import Boundary
from .contract import STAT_NAMES, TokenBatch
from .head import fused, recompute, sharded
from .head.plan import accumulator_dtype, saved_grad_dtype
from .specs import HeadSpec, LossSpec

_EMPTY = (0,)
NEEDS = (("need_hidden", "bool"), ("need_weight", "bool"), ("need_bias", "bool"))
HEAD_TENSORS = (("hidden", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor?"), ("targets", "Tensor"))


def _empty_if_none(x, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(_EMPTY)


def _fake_grads(hidden, weight, bias, needs, dtype):
    return (hidden.new_empty(hidden.shape, dtype=dtype) if needs[0] else hidden.new_empty(_EMPTY),
            weight.new_empty(weight.shape, dtype=dtype) if needs[1] else hidden.new_empty(_EMPTY),
            bias.new_empty(bias.shape, dtype=dtype) if needs[2] and bias is not None else hidden.new_empty(_EMPTY))


def _fake_loss_outputs(like: Tensor, mask: Tensor):
    """loss, stats and the per-row clip counts (B, 2)."""
    dtype = accumulator_dtype(like.dtype)
    return (like.new_empty((), dtype=dtype), like.new_empty((len(STAT_NAMES),), dtype=dtype),
            like.new_empty((mask.shape[0], 2), dtype=dtype))


def _needs(a) -> tuple[bool, bool, bool]:
    return a["need_hidden"], a["need_weight"], a["need_bias"] and a["bias"] is not None


class Ops:
    """The four custom ops of ``namespace``, their argument lists derived from ``batch_cls``, ``loss_cls`` and
    ``head_cls`` (the package's ops use ``TokenBatch``, ``LossSpec``, ``HeadSpec`` under ``rankgrpo``)."""

    def __init__(self, namespace: str, loss_cls=LossSpec, head_cls=HeadSpec, batch_cls=TokenBatch):
        specs = (("batch", batch_cls), ("spec", loss_cls), ("head", head_cls))
        self.fused_loss_args = Boundary(HEAD_TENSORS, specs, (("compute_entropy", "bool"), *NEEDS))
        self.fused_logprobs_args = Boundary((*HEAD_TENSORS, ("mask", "Tensor?")), specs[2:],
                                            (("compute_entropy", "bool"),))
        self.logprob_grads_args = Boundary(HEAD_TENSORS, specs[2:], (
            ("lse", "Tensor"), ("grad_logp", "Tensor"), ("entropy", "Tensor?"), ("grad_entropy", "Tensor?"), *NEEDS))
        self.loss_from_logps_args = Boundary((), specs)
        self.fused_loss_op = self._define(namespace, "fused_loss", self.fused_loss_args, 7)
        self.fused_logprobs_op = self._define(namespace, "fused_logprobs", self.fused_logprobs_args, 3)
        self.logprob_grads_op = self._define(namespace, "logprob_grads", self.logprob_grads_args, 3)
        self.loss_from_logps_op = self._define(namespace, "loss_from_logps", self.loss_from_logps_args, 4)

    def _define(self, namespace, name, boundary: Boundary, outputs: int):
        def impl(*args):
            return getattr(self, f"_{name}")(boundary.rebuild(args))

        def fake(*args):
            return getattr(self, f"_{name}_fake")(boundary.rebuild(args))

        op = torch.library.custom_op(f"{namespace}::{name}", impl, mutates_args=(),
                                     schema=boundary.schema("(" + ", ".join(["Tensor"] * outputs) + ")"))
        op.register_fake(fake)
        setup = getattr(self, f"_{name}_setup", None)
        if setup is not None:
            op.register_autograd(getattr(self, f"_{name}_backward"),
                                 setup_context=lambda ctx, inputs, output: setup(ctx, boundary.rebuild(inputs),
                                                                                 output, len(inputs)))
        return op

    # --- Python entry points: flatten once ---------------------------------------------------------------------

    def fused_loss(self, hidden, weight, bias, targets, batch, spec, head, *, compute_entropy, needs):
        need_hidden, need_weight, need_bias = needs
        return self.fused_loss_op(*self.fused_loss_args.flatten(
            hidden=hidden, weight=weight, bias=bias, targets=targets, batch=batch, spec=spec, head=head,
            compute_entropy=compute_entropy, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias))

    def fused_logprobs(self, hidden, weight, bias, targets, mask, head, *, compute_entropy):
        return self.fused_logprobs_op(*self.fused_logprobs_args.flatten(
            hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, head=head,
            compute_entropy=compute_entropy))

    def loss_from_logps(self, batch, spec, head):
        return self.loss_from_logps_op(*self.loss_from_logps_args.flatten(batch=batch, spec=spec, head=head))

    # --- fused loss: the gradient in the forward ---------------------------------------------------------------

    @staticmethod
    def _fused_loss(a):
        loss, stats, row_clipped, computed, *grads = fused.loss_and_grads(
            a["hidden"], a["weight"], a["bias"], a["targets"], a["batch"], a["spec"], a["head"],
            compute_entropy=a["compute_entropy"], needs=_needs(a))
        return (loss, stats, row_clipped, computed, *(_empty_if_none(g, a["hidden"]) for g in grads))

    @staticmethod
    def _fused_loss_fake(a):
        loss, stats, row_clipped = _fake_loss_outputs(a["hidden"], a["batch"].mask)
        return (loss, stats, row_clipped, loss.new_empty(()),
                *_fake_grads(a["hidden"], a["weight"], a["bias"], _needs(a), saved_grad_dtype(a["hidden"].dtype)))

    @staticmethod
    def _fused_loss_setup(ctx, a, output, num_inputs):
        ctx.save_for_backward(*output[4:])
        # the gradient outputs take no gradient: autograd would otherwise pass zeros the size of d_weight here
        ctx.set_materialize_grads(False)
        ctx.needs, ctx.input_dtype = _needs(a), a["hidden"].dtype
        ctx.num_inputs, ctx.spent = num_inputs, False

    @staticmethod
    def _fused_loss_backward(ctx, grad_loss, _stats, _row_clipped, _computed, _d_hidden, _d_weight, _d_bias):
        if ctx.spent:
            raise RuntimeError("rank_grpo_loss forms its gradients in the forward and scales them in place in the "
                               "backward, so its graph runs backward once: call the loss again instead of "
                               "retain_graph=True")
        compiling = torch.compiler.is_compiling()
        grads = []
        for saved, needed in zip(ctx.saved_tensors, ctx.needs):
            if not needed or grad_loss is None:  # None: only the statistics reached the backward
                grads.append(None)
            elif type(saved) is torch.Tensor and not compiling:
                # Eager: in place, so the backward's peak holds no second (N, H) and (V, H) tensor; on a CPU, where
                # reading the incoming gradient costs no device sync, a gradient of 1 (loss.backward()) skips it.
                if not (saved.device.type == "cpu" and grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
                    saved.mul_(grad_loss.to(saved.dtype))
                grads.append(saved.to(ctx.input_dtype))  # fp16 inputs: fp32 gradients cast after the loss scale
                ctx.spent = True
            else:  # traced (torch.compile, opcheck): out of place, and the compiler plans the memory
                grads.append((saved * grad_loss.to(saved.dtype)).to(ctx.input_dtype))
        return (*grads, *([None] * (ctx.num_inputs - 3)))

    # --- the recompute path: log-probs, and their gradients in the backward ----------------------------------

    @staticmethod
    def _logprob_grads(a):
        grads = recompute.logprob_grads(a["hidden"], a["weight"], a["bias"], a["targets"], a["head"], a["lse"],
                                        a["grad_logp"], _needs(a), a["entropy"], a["grad_entropy"])
        return tuple(_empty_if_none(g, a["hidden"]) for g in grads)

    @staticmethod
    def _logprob_grads_fake(a):
        return _fake_grads(a["hidden"], a["weight"], a["bias"], _needs(a), a["hidden"].dtype)

    @staticmethod
    def _fused_logprobs(a):
        positions = None if a["mask"] is None else a["mask"].nonzero().squeeze(1)  # the sizes: one host sync
        logp, lse, entropy = recompute.logprobs(a["hidden"], a["weight"], a["bias"], a["targets"], a["head"],
                                                a["compute_entropy"], positions)
        return logp, lse, _empty_if_none(entropy, lse)

    @staticmethod
    def _fused_logprobs_fake(a):
        hidden = a["hidden"]
        dtype, N = accumulator_dtype(hidden.dtype), hidden.shape[0]
        return (hidden.new_empty((N,), dtype=dtype), hidden.new_empty((N,), dtype=dtype),
                hidden.new_empty((N,) if a["compute_entropy"] else _EMPTY, dtype=dtype))

    @staticmethod
    def _fused_logprobs_setup(ctx, a, output, num_inputs):
        entropy = output[2] if a["compute_entropy"] else None
        ctx.save_for_backward(a["hidden"], a["weight"], a["bias"], a["targets"], output[1], entropy, a["mask"])
        ctx.head, ctx.num_inputs = a["head"], num_inputs

    def _fused_logprobs_backward(self, ctx, grad_logp, _lse, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, mask = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        if entropy is None:
            grad_entropy = None
        if mask is not None:  # the unlisted tokens' log-probs and entropies are the constant 0
            grad_logp = torch.where(mask, grad_logp, 0)
            grad_entropy = None if grad_entropy is None else torch.where(mask, grad_entropy, 0)
        d_hidden, d_weight, d_bias = self.logprob_grads_op(*self.logprob_grads_args.flatten(
            hidden=hidden, weight=weight, bias=bias, targets=targets, head=ctx.head, lse=lse, grad_logp=grad_logp,
            entropy=entropy, grad_entropy=grad_entropy, need_hidden=need_hidden, need_weight=need_weight,
            need_bias=need_bias))
        return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
                *([None] * (ctx.num_inputs - 3)))

    # --- loss from log-probs ---------------------------------------------------------------------------------

    @staticmethod
    def _loss_from_logps(a):
        loss, stats, grad_logp, row_clipped = backends.load(a["head"].backend).segment_loss(a["batch"],
                                                                                             spec=a["spec"])
        return loss, stats, row_clipped, grad_logp

    @staticmethod
    def _loss_from_logps_fake(a):
        logps = a["batch"].logps
        return (*_fake_loss_outputs(logps, a["batch"].mask),
                logps.new_empty(logps.shape, dtype=accumulator_dtype(logps.dtype)))

    def _loss_from_logps_setup(self, ctx, a, output, num_inputs):
        ctx.save_for_backward(output[3])
        ctx.logps_dtype, ctx.num_inputs = a["batch"].logps.dtype, num_inputs
        ctx.logps_index = self.loss_from_logps_args.names.index("logps")

    @staticmethod
    def _loss_from_logps_backward(ctx, grad_loss, _stats, _row_clipped, _grad_logp):
        (grad_logp,) = ctx.saved_tensors
        grads = [None] * ctx.num_inputs
        grads[ctx.logps_index] = (grad_logp * grad_loss).to(ctx.logps_dtype)
        return tuple(grads)

    # --- the vocabulary-sharded head (not a custom op: it runs collectives) -------------------------------------

    def sharded_loss(self, hidden, weight, bias, targets, batch, spec, head, *, vocab_start, compute_entropy, group):
        """The loss over a vocabulary-parallel head: sharded log-probs (``head/sharded.py``), the segment loss, and
        the entropy bonus with its gradient through the sharded entropies."""
        compute_entropy = compute_entropy or spec.entropy_coef != 0.0
        logp, entropy = sharded.sharded_logprobs(hidden, weight, bias, targets, batch.mask.reshape(-1), vocab_start,
                                                 head, compute_entropy, group)
        B, T = batch.mask.shape
        batch = dataclasses.replace(batch, logps=logp.view(B, T),
                                    entropy=None if entropy is None else entropy.view(B, T))
        loss, stats, row_clipped, _ = self.loss_from_logps(batch, spec, head)
        if spec.entropy_coef != 0.0:
            weights, count = fused.entropy_bonus_weights(batch, loss.dtype)
            loss = loss - spec.entropy_coef * torch.where(weights != 0, entropy, 0).sum() / count
        return loss, stats, row_clipped


OPS = Ops("rankgrpo")
